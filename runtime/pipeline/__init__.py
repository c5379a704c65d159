"""The stages a frame goes through, each taking and returning small dataclasses: preprocess, segment candidates,
dense features, the guidance-free and guided heads, refinement, label lookup over a vocabulary, the encoders they run,
and drawing."""
