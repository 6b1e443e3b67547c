"""ald_jax: Actor-Learner Distillation in JAX (Parisotto & Salakhutdinov, ICLR 2021)."""

__version__ = "0.1.0"
