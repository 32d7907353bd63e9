"""dsel: pretraining data selection (PDS and CoLoR-Filter), end to end."""

__version__ = "0.1.0"
