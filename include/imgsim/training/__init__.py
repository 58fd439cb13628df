"""Training the embedding on the references' labels (:mod:`imgsim.training.train`)."""
