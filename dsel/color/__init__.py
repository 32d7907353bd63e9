"""CoLoR-Filter: prior and conditional models and their conditional loss reduction score."""
