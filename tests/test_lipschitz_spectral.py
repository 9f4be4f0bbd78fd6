"""jacobian_spectral_norm, power_iteration, lanczos against float64 NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lipnorm.lipschitz import jacobian_spectral_norm, power_iteration
from lipnorm.lipschitz.spectral import choose_method, lanczos   # internals, tested directly
from lipschitz_testing import explicit_norm, x64  # noqa: F401


ALL = ("auto", "jacfwd", "jacrev", "power", "lanczos")


def _pytree_fn(seed, n_in, n_out):
  """A smooth pytree -> pytree function with a known explicit Jacobian reference."""
  rng = np.random.default_rng(seed)
  a = jnp.asarray(rng.normal(size=(7, n_in)))
  b = jnp.asarray(rng.normal(size=(n_out, 7)))

  def f(tree):
    x = jnp.concatenate([tree["u"], tree["w"].ravel()])
    h = jnp.tanh(a @ x)
    return {"y": b @ h, "z": jnp.sum(h ** 2)[None]}

  def f_flat(v):
    y = f({"u": v[:2], "w": v[2:].reshape(-1, 1)})
    return jnp.concatenate([y["y"], y["z"]])
  x = {"u": jnp.asarray(rng.normal(size=2)), "w": jnp.asarray(rng.normal(size=(n_in - 2, 1)))}
  return f, f_flat, x


@pytest.mark.parametrize("n_in,n_out", [(5, 30), (12, 3)])
@pytest.mark.slow
def test_methods_match_explicit_svd(x64, n_in, n_out):
  f, f_flat, x = _pytree_fn(n_in, n_in, n_out)
  flat = jnp.concatenate([x["u"], x["w"].ravel()])
  ref = explicit_norm(f_flat, flat)
  for method in ALL:
    res = jacobian_spectral_norm(f, x, method=method, tol=1e-10, num_iters=500)
    assert bool(res.finite) and bool(res.converged), method
    tol = 1e-6 if res.method in ("jacfwd", "jacrev") else 1e-8
    np.testing.assert_allclose(float(res.value), ref, rtol=tol, err_msg=method)
  assert jacobian_spectral_norm(f, x).method == ("jacfwd" if n_in <= n_out + 1 else "jacrev")


@pytest.mark.slow
def test_iterative_report_convergence_and_stop_at_tolerance(x64):
  """A loose tolerance stops early and still lands within a few tol of the truth; the
  reported residual / relative change describe the returned estimate."""
  f, f_flat, x = _pytree_fn(3, 40, 30)
  flat = jnp.concatenate([x["u"], x["w"].ravel()])
  ref = explicit_norm(f_flat, flat)
  for method in ("power", "lanczos"):
    loose = jacobian_spectral_norm(f, x, method=method, tol=1e-3, num_iters=500)
    tight = jacobian_spectral_norm(f, x, method=method, tol=1e-12, num_iters=500)
    assert bool(loose.converged) and int(loose.iterations) <= int(tight.iterations)
    assert float(loose.value) <= ref * (1 + 1e-12)     # Rayleigh quotients never exceed
    assert abs(float(loose.value) / ref - 1) < 1e-2
    assert abs(float(tight.value) / ref - 1) < 1e-9
    assert 0 <= float(loose.residual) and float(tight.residual) < 1e-4
  capped = jacobian_spectral_norm(f, x, method="power", tol=0.0, num_iters=2)
  assert not bool(capped.converged) and int(capped.iterations) == 2
  assert float(capped.rel_change) > 0


@pytest.mark.slow
def test_lanczos_and_power_top_k_of_symmetric_matrix(x64):
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(40, 40)))
  evals = np.concatenate([[9.0, 7.0, 5.0], rng.uniform(-3, 3, 37)])
  mat = (q * evals) @ q.T
  matvec = lambda v: jnp.asarray(mat) @ v   # noqa: E731
  v0 = jnp.asarray(rng.normal(size=40))
  ref = np.sort(np.linalg.eigvalsh(mat))[::-1][:3]
  eig = lanczos(matvec, v0, k=3, num_iters=40, tol=1e-10)
  np.testing.assert_allclose(np.asarray(eig.eigenvalues), ref, rtol=1e-9)
  assert bool(eig.converged) and np.all(np.asarray(eig.residuals) <= 1e-9 * ref)
  # Ritz vectors are eigenvectors
  for lam, vec in zip(np.asarray(eig.eigenvalues), np.asarray(eig.eigenvectors)):
    np.testing.assert_allclose(mat @ vec, lam * vec, atol=1e-7)
  pw = power_iteration(matvec, v0, num_iters=2000, tol=1e-14)
  np.testing.assert_allclose(float(pw.eigenvalues[0]), 9.0, rtol=1e-9)


@pytest.mark.slow
def test_vmappable_and_jittable(x64):
  a = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)))
  xs = jnp.asarray(np.random.default_rng(2).normal(size=(3, 6)))

  @jax.jit
  def norms(xs):
    return jax.vmap(lambda x: jacobian_spectral_norm(lambda z: jnp.sin(a @ z), x,
                                                     method="lanczos").value)(xs)
  ref = [explicit_norm(lambda z: jnp.sin(a @ z), x) for x in xs]
  np.testing.assert_allclose(np.asarray(norms(xs)), ref, rtol=1e-7)


def test_auto_choice():
  assert choose_method(32 * 32 * 3, 10) == "jacrev"        # CIFAR input, 10 logits
  assert choose_method(8, 100) == "jacfwd"
  assert choose_method(10 ** 6, 10 ** 4) == "lanczos"       # 40 GB Jacobian
  assert choose_method(3072, 10, max_jacobian_bytes=1000) == "lanczos"


@pytest.mark.slow
def test_bad_input():
  f = lambda x: x ** 2   # noqa: E731
  with pytest.raises(ValueError, match="method='svd'.*allowed: auto"):
    jacobian_spectral_norm(f, jnp.ones(3), method="svd")
  with pytest.raises(ValueError, match="num_iters"):
    jacobian_spectral_norm(f, jnp.ones(3), method="power", num_iters=0)
  with pytest.raises(ValueError, match="non-finite"):
    jacobian_spectral_norm(lambda x: x / 0.0, jnp.ones(3))
  with pytest.raises(ValueError, match="non-finite"):
    jacobian_spectral_norm(jnp.log, -jnp.ones(3), method="lanczos")
