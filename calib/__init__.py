"""ovseg.calib: INT8 calibration of the image encoders, and the accuracy gate every lower precision passes."""
