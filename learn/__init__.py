"""Training of Tokenyard's learned models (offline I/O: data readers, token counting,
trainers, reports). What a trained model answers at request time lives in
`scheduler.predictors`; this package only builds and evaluates the files it loads."""
