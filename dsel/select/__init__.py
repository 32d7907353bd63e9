"""Selection from score tables: top-k, Gumbel-top-k, token budgets, CoLoR tau modes, baselines."""
