"""HiDiff's binary Bernoulli diffusion (BBDM) and the refinement steps built on it."""
