"""Operator benchmark on KMock (see __main__)."""
