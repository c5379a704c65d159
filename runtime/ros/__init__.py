"""ovseg as a ROS 2 node (``ovseg-ros``, docs/ros.md). rclpy is imported only inside this package, by ``node``."""
