"""Learned predictors the decisions read: pure scoring of a request's own features from a
versioned model file (trained by `tokenyard train`, package `learn`). No I/O on the hot
path beyond loading the file once."""
