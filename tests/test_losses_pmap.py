"""Split-batch equivalence of the losses under `pmap` with `axis_name`.

Runs in a subprocess with 2 host CPU devices (XLA_FLAGS must be set before
JAX is imported). A tiny linear model with replicated parameters produces the
logits and values from per-device features; the pmapped loss (with
`axis_name`) and its `pmean`-ed parameter gradients on a batch split in two
must equal the single-device loss and gradients on the concatenated batch.
Masks differ between the halves, so per-device counts differ.
"""
import os
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from ald_jax import losses

    assert jax.local_device_count() == 2, jax.devices()
    T, B, A, F = 5, 6, 3, 4          # B = global batch, split 3 + 3.
    rng = np.random.default_rng(0)
    features = rng.normal(size=(T, B, F)).astype(np.float32)
    actions = rng.integers(0, A, size=(T, B)).astype(np.int32)
    advantages = rng.normal(size=(T, B)).astype(np.float32)
    weights = rng.uniform(0.5, 1.5, size=(T, B)).astype(np.float32)
    mask = np.ones((T, B), np.float32)
    mask[:, :3] = rng.uniform(size=(T, 3)) > 0.6   # device 0: few valid.
    mask[:, 3:] = rng.uniform(size=(T, 3)) > 0.1   # device 1: most valid.
    assert mask[:, :3].sum() != mask[:, 3:].sum()
    params = dict(
        pi=rng.normal(size=(F, A)).astype(np.float32),
        target=rng.normal(size=(F, A)).astype(np.float32),
        v=rng.normal(size=(F,)).astype(np.float32),
        learner=rng.normal(size=(F, A)).astype(np.float32),
        learner_v=rng.normal(size=(F,)).astype(np.float32))
    duals = losses.init_vmpo_duals(0.7, 2.0)
    data = (features, actions, advantages, weights, mask)

    def vmpo(params, duals, data, axis_name):
      x, act, adv, w, m = data
      return losses.vmpo_loss(
          x @ params["pi"], x @ params["target"], act, adv, duals, m,
          eps_eta=0.05, eps_alpha=0.01, top_k_fraction=0.5,
          axis_name=axis_name, importance_weights=w)

    def distill(params, duals, data, axis_name):
      x, _, _, _, m = data
      return losses.distillation_loss(
          x @ params["pi"], x @ params["v"], x @ params["learner"],
          x @ params["learner_v"], m, alpha_pi=0.8, alpha_v=0.3,
          axis_name=axis_name)

    def value(params, duals, data, axis_name):
      x, _, adv, _, m = data
      return losses.value_loss(x @ params["v"], adv, m, axis_name=axis_name)

    def split(x):  # [T, B, ...] -> [2, T, B / 2, ...]
      return np.stack([x[:, :B // 2], x[:, B // 2:]])

    def replicate(tree):
      return jax.tree.map(lambda a: jnp.stack([a, a]), tree)

    for name, fn in [("vmpo", vmpo), ("distillation", distill),
                     ("value", value)]:
      grad_fn = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)
      (loss, metrics), grads = jax.jit(
          lambda p, d, x: grad_fn(p, d, x, None))(params, duals, data)

      def device_fn(p, d, x):
        (loss, metrics), grads = grad_fn(p, d, x, "i")
        return loss, metrics, jax.lax.pmean(grads, "i")

      p_loss, p_metrics, p_grads = jax.pmap(device_fn, axis_name="i")(
          replicate(params), replicate(duals),
          tuple(split(np.asarray(a)) for a in data))
      for device in range(2):
        np.testing.assert_allclose(p_loss[device], loss, rtol=2e-5,
                                   err_msg=name)
        for key, value in metrics.items():
          np.testing.assert_allclose(p_metrics[key][device], value,
                                     rtol=2e-5, atol=1e-6,
                                     err_msg=f"{name} {key}")
        flat = jax.tree.leaves(grads)
        p_flat = jax.tree.leaves(p_grads)
        assert len(flat) == len(p_flat)
        for g, pg in zip(flat, p_flat):
          np.testing.assert_allclose(pg[device], g, rtol=1e-4, atol=1e-6,
                                     err_msg=name)
      assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))
      print(name, "loss", float(loss), "OK")
    """)


def test_pmapped_losses_equal_single_device_on_concatenated_batch():
  env = dict(os.environ)
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=60")
  env["NPROC"] = os.environ.get("NPROC", "4")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  result = subprocess.run([sys.executable, "-c", CHILD], env=env,
                          cwd=str(REPO), capture_output=True, text=True,
                          timeout=180)
  assert result.returncode == 0, result.stdout + result.stderr
  for name in ("vmpo", "distillation", "value"):
    assert f"{name} loss" in result.stdout and "OK" in result.stdout
