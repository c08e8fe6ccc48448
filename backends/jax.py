r"""JAX adapter: fixed points as differentiable JAX functions, under ``jax.jit``, ``jax.vmap`` and ``jax.grad``.

:func:`fixed_point` finds :math:`h^* = f(h^*, \theta)` for a map ``f(h, params)`` of pytrees and
returns it with a :class:`FixedPointInfo`. Its reverse-mode derivative with respect to
``params`` is the implicit gradient :math:`z^T \partial f / \partial \theta` with
:math:`(I - J^T) z = \partial L / \partial h^*`, solved by the chosen adjoint method of
:mod:`rbp_core` through a ``jax.custom_vjp`` (``h0`` gets none): the forward iterations record
nothing, and the backward pass costs one VJP of ``f`` per iteration of its solve.

Two drivers run the same solver objects. Called on concrete arrays (eagerly, also inside
``jax.grad``), the solves are the core's :func:`rbp_core.fixed_point` and
:func:`rbp_core.implicit_backward`: full :class:`~rbp_core.Solution` records in ``info.forward``
and ``info.backward``, certified error bounds, and exceptions. Under ``jax.jit`` or ``jax.vmap``
they run in ``jax.lax.while_loop`` (``backends/_jax_loop.py``), with each solver's
per-sample form, and report their status, step count and residual norm as arrays; a failure is
raised at run time through a host callback (a ``JaxRuntimeError`` carrying the message) where
the policy says so. Under ``jax.vmap`` each problem of the batch is solved on its own.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import rbp_core
from rbp_core import AdjointMethod, BackwardFailureWarning, ForwardSolver, Solution
from rbp_core._adjoint import OnFailure, check_policy, failure_cotangent
from rbp_core._batched import _init as init_forward
from rbp_core._checks import check_contraction, check_instance
from rbp_core._floats import eps
from rbp_core._forward import check_solver
from rbp_core._operator import AdjointOperator
from rbp_core._sample_driver import per_sample

from ._jax_loop import STATUSES, TracedOps, run

__all__ = ["STATUSES", "BackwardFailureWarning", "FixedPointInfo", "fixed_point"]

ADJOINT_METHODS = (
    rbp_core.Neumann,
    rbp_core.OriginalRBP,
    rbp_core.CGRBP,
    rbp_core.GMRES,
    rbp_core.BiCGSTAB,
    rbp_core.AndersonRBP,
)


@dataclass(eq=False)
class _Record:
    """The eager solves' Solutions (identity-hashed: it rides along as a pytree's static data)."""

    forward: Solution | None = None
    backward: list[Solution] = field(default_factory=list)


@jax.tree_util.register_pytree_node_class
@dataclass(eq=False)
class FixedPointInfo:
    """What :func:`fixed_point` reports about its solves.

    ``status`` (an int32 array: a code into :data:`STATUSES`, 0 for SUCCESS), ``num_steps``,
    ``residual_norm`` (the forward solve's last monitored norm, in the units of ``h``) and
    ``contraction_violated`` are arrays, also under ``jax.jit`` and ``jax.vmap`` (one per problem).
    ``forward`` and ``backward`` hold the :class:`~rbp_core.Solution` records of eager calls only:
    the forward solve, and each backward solve as it runs (``jax.grad`` of an eager call fills it).
    """

    status: Any
    num_steps: Any
    residual_norm: Any
    contraction_violated: Any
    record: _Record = field(default_factory=_Record)

    @property
    def forward(self) -> Solution | None:
        """The forward Solution of an eager call (None under ``jax.jit`` or ``jax.vmap``)."""
        return self.record.forward

    @property
    def backward(self) -> list[Solution]:
        """The backward Solutions of an eager call, in the order they ran."""
        return self.record.backward

    @property
    def converged(self) -> Any:
        """``status == 0``, an array."""
        return self.status == 0

    def tree_flatten(self) -> tuple[tuple[Any, ...], _Record]:
        return (self.status, self.num_steps, self.residual_norm, self.contraction_violated), self.record

    @classmethod
    def tree_unflatten(cls, record: _Record, children: tuple[Any, ...]) -> FixedPointInfo:
        status, num_steps, residual_norm, violated = children
        return cls(status, num_steps, residual_norm, violated, record=record)


def fixed_point(
    f: Callable[[Any, Any], Any],
    h0: Any,
    params: Any,
    *,
    backward: AdjointMethod,
    solver: ForwardSolver | None = None,
    contraction: float | None = None,
    throw: bool = True,
    on_backward_failure: OnFailure = "skip",
) -> tuple[Any, FixedPointInfo]:
    r"""The fixed point :math:`h^* = f(h^*, \theta)`, differentiable with respect to ``params`` by an implicit adjoint.

    Parameters
    ----------
    f : callable
        ``f(h, params)``: returns a pytree of the structure, shapes and dtypes of ``h``.
    h0 : pytree
        The starting point: floating arrays of one dtype. It gets no gradient.
    params : pytree
        :math:`\theta`: floating arrays (a leaf of another dtype is refused; close over
        non-differentiable settings in ``f`` instead).
    backward : adjoint method
        How the backward pass solves :math:`(I - J^T) z = \partial L / \partial h^*`:
        :class:`~rbp_core.Neumann`, :class:`~rbp_core.OriginalRBP`, :class:`~rbp_core.CGRBP`,
        :class:`~rbp_core.GMRES`, :class:`~rbp_core.BiCGSTAB` or :class:`~rbp_core.AndersonRBP`.
    solver : forward solver, optional
        :class:`~rbp_core.FixedPointIteration` (default), :class:`~rbp_core.Anderson` or
        :class:`~rbp_core.Broyden`, with their tolerances and budgets.
    contraction : float, optional
        A Lipschitz bound :math:`\mu < 1` of ``f`` in ``h``: eager calls certify error bounds
        with it; every call checks the ratios of successive norms of the solvers that have them
        against it (``info.contraction_violated``).
    throw : bool
        A forward solve that fails raises: :class:`~rbp_core.ConvergenceError` in an eager call,
        a ``JaxRuntimeError`` with the same message at run time under ``jax.jit`` or ``jax.vmap``.
        With False, read ``info.status``.
    on_backward_failure : {"skip", "raise", "warn", "ignore"}
        What a backward solve that does not converge does, as in the PyTorch adapter: a zero
        gradient with a :class:`~rbp_core.BackwardFailureWarning` (``"skip"``), an error,
        the unconverged adjoint with a warning, or silently. A non-finite backward iteration
        always raises (``FloatingPointError``, or a ``JaxRuntimeError`` under a transformation).

    Returns
    -------
    tuple
        ``(h_star, info)``: ``h_star`` with the structure of ``h0``, and a :class:`FixedPointInfo`.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import rbp_core
    >>> from rbp_core.backends.jax import fixed_point
    >>> def loss(W, x):
    ...     h, info = fixed_point(lambda h, W: jnp.tanh(W @ h + x), jnp.zeros(3), W,
    ...                           backward=rbp_core.GMRES(rtol=1e-6), solver=rbp_core.FixedPointIteration(rtol=1e-6))
    ...     return jnp.sum(h ** 2)
    >>> W = 0.3 * jnp.eye(3)
    >>> g = jax.jit(jax.grad(loss))(W, jnp.ones(3))
    >>> g.shape
    (3, 3)
    """
    solver = check_solver(solver)
    backward = _check_backward(backward)
    mu = check_contraction(contraction)
    _check_flags(f, throw, on_backward_failure)
    dtype = _check_tree(h0, "h0", same_dtype=True)
    _check_tree(params, "params")
    flat0, unravel = ravel_pytree(h0)
    structure = jax.tree_util.tree_structure(h0)
    _check_output(f, h0, params, structure)

    # Values that f closes over and a transformation traces (an input x under jax.grad or jax.vmap)
    # become arguments of the custom_vjp next to params, so that their gradients flow too.
    f_closed, consts = jax.closure_convert(f, h0, params)

    def F(h: Any, p: Any) -> Any:
        own, closed = p
        return ravel_pytree(f_closed(unravel(h), own, *closed))[0]

    record = _Record()
    root_eps = math.sqrt(float(eps(jnp, dtype)))

    def forward(p: Any, h_init: Any) -> tuple[Any, tuple[Any, ...]]:
        # Traced when the inputs are, or when f closes over traced values (its output then is one).
        if not (_traced(p, h_init) or _traced(F(h_init, p))):
            sol = rbp_core.fixed_point(lambda h: F(h, p), h_init, solver, contraction=mu, throw=throw)
            record.forward = sol
            residual = sol.residual_norms[-1] if sol.residual_norms else 0.0
            return sol.value, (
                jnp.asarray(STATUSES.index(sol.status), dtype=jnp.int32),
                jnp.asarray(sol.num_steps, dtype=jnp.int32),
                jnp.asarray(residual, dtype=_wide(dtype)),
                jnp.asarray(sol.contraction_violated),
            )
        form = per_sample(solver, type(solver).__name__)
        ops = TracedOps(jnp)
        rows0 = h_init[None, :]
        fmap = _RowMap(lambda H: F(H[0], p)[None, :])
        result = run(
            form,
            fmap,
            init_forward(form, fmap, rows0, ops, secants=False),
            ops=ops,
            limits=form.limits(jnp, dtype),
            scale=jnp.sqrt(ops.sqnorm(rows0)[0]),
            forward=True,
            ratio_bound=None if mu is None else form.step_contraction(mu),
            rel_slack=root_eps,
        )
        codes = (result.status, result.num_steps, result.residual_norm, result.contraction_violated)
        if throw:
            jax.debug.callback(functools.partial(_raise_forward, solver.name), *codes, result.tolerance)
        return result.value[0], codes

    def backward_pass(h: Any, p: Any, g: Any) -> Any:
        _, vjp_p = jax.vjp(lambda q: F(h, q), p)
        _, vjp_h = jax.vjp(lambda v: F(v, p), h)
        jvp_h = jax.linearize(lambda v: F(v, p), h)[1] if backward.needs_jvp else None
        if not (_traced(h, p, g) or _traced(vjp_h(g))):
            grads, _ = rbp_core.implicit_backward(
                lambda v: vjp_h(v)[0],
                lambda z: vjp_p(z)[0],
                g,
                backward,
                jvp_state=jvp_h,
                contraction=mu,
                on_failure=on_backward_failure,
                on_solution=record.backward.append,
            )
            return grads
        z = _traced_adjoint(backward, vjp_h, jvp_h, g, mu, root_eps, on_backward_failure)
        return vjp_p(z)[0]

    @jax.custom_vjp
    def layer(p: Any, h_init: Any) -> tuple[Any, tuple[Any, ...]]:
        return forward(p, h_init)

    def layer_fwd(p: Any, h_init: Any) -> tuple[tuple[Any, tuple[Any, ...]], tuple[Any, Any]]:
        h, codes = forward(p, h_init)
        return (h, codes), (h, p)

    def layer_bwd(saved: tuple[Any, Any], cotangents: tuple[Any, Any]) -> tuple[Any, Any]:
        h, p = saved
        return backward_pass(h, p, cotangents[0]), jnp.zeros_like(h)

    layer.defvjp(layer_fwd, layer_bwd)
    h_star, codes = layer((params, tuple(consts)), flat0)
    status, num_steps, residual_norm, violated = codes
    return unravel(h_star), FixedPointInfo(status, num_steps, residual_norm, violated, record=record)


class _RowMap:
    """A map on ``(1, n)`` rows that counts its calls (the traced driver's problem)."""

    __slots__ = ("calls", "fn")

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, v: Any) -> Any:
        self.calls += 1
        return self.fn(v)


def _traced_adjoint(
    method: AdjointMethod,
    vjp_h: Callable[[Any], Any],
    jvp_h: Callable[[Any], Any] | None,
    g: Any,
    mu: float | None,
    root_eps: float,
    policy: OnFailure,
) -> Any:
    """The adjoint ``z`` under a transformation: the traced driver on ``g`` scaled exactly to unit norm, then the policy."""
    form = per_sample(method, type(method).__name__)
    ops = TracedOps(jnp)
    gnorm = jnp.sqrt(ops.sqnorm(g[None, :])[0])
    finite_g = jnp.isfinite(gnorm)
    exponent = jnp.frexp(jnp.where(finite_g & (gnorm > 0), gnorm, 1.0))[1]
    unit = jnp.ldexp(jnp.ones((), dtype=g.dtype), exponent)  # a power of two: exact scaling
    rows = (g / unit)[None, :]
    vjp = _RowMap(lambda v: vjp_h(v[0])[0][None, :])
    jvp = None if jvp_h is None else _RowMap(lambda v: jvp_h(v[0])[None, :])
    A = AdjointOperator(jnp, vjp, jvp, checks_contraction=False)  # type: ignore[arg-type]
    result = run(
        form,
        A,
        form.init(A, rows, None, ops),
        ops=ops,
        limits=form.limits(jnp, g.dtype),
        scale=gnorm / unit,
        forward=False,
        ratio_bound=mu if getattr(form, "successive_images", False) else None,
        rel_slack=root_eps,
    )
    z = result.value[0] * unit
    ok = result.status == 0
    codes = (
        result.status,
        result.num_steps,
        result.residual_norm * unit,
        result.contraction_violated,
        result.tolerance * unit,
    )
    jax.debug.callback(
        functools.partial(_backward_policy, type(method).__name__, method.name, policy, mu), finite_g, *codes
    )
    if policy == "skip":
        z = jnp.where(ok, z, jnp.zeros_like(z))
    return z


def _report(
    method: str,
    status: int,
    steps: int,
    residual: float,
    tolerance: float,
    *,
    violated: bool = False,
    nonfinite_input: bool = False,
) -> Solution:
    """A traced solve's report as a Solution (no value), for messages and the core's failure policy."""
    return Solution(
        value=None,
        status=STATUSES[status],
        method=method,
        num_steps=steps,
        num_vjp=0,
        num_jvp=0,
        residual_norms=(residual,),
        tolerance=tolerance if tolerance >= 0 else None,
        error_bound=None,
        note="reported by the traced driver (jax.jit or jax.vmap), which counts steps, not calls",
        contraction_violated=violated,
        stats=types.MappingProxyType({"nonfinite_input": True} if nonfinite_input else {}),
    )


def _rows(*arrays: Any) -> Any:
    """The per-problem values of a callback's arrays (one problem, or a batch under ``jax.vmap``)."""
    return zip(*(jnp.ravel(jnp.asarray(a)).tolist() for a in arrays), strict=True)


def _raise_forward(method: str, status: Any, steps: Any, residual: Any, violated: Any, tolerance: Any) -> None:
    """Host side of a traced forward solve with ``throw``: raise for the first problem that failed."""
    for s, n, r, v, t in _rows(status, steps, residual, violated, tolerance):
        if s != 0:
            raise rbp_core.ConvergenceError(_report(method, s, n, r, t))
        if v:
            msg = f"forward solve {method}: the claimed contraction was disproved by the iteration"
            raise rbp_core.ContractionViolation(msg)


def _backward_policy(
    name: str,
    method: str,
    policy: OnFailure,
    contraction: float | None,
    finite_g: Any,
    status: Any,
    steps: Any,
    residual: Any,
    violated: Any,
    tolerance: Any,
) -> None:
    """Host side of a traced backward solve: for every problem of the batch, the core's policy
    (:func:`rbp_core._adjoint.failure_cotangent`) on its report raises or warns as an eager call would."""
    for finite, s, n, r, v, t in _rows(finite_g, status, steps, residual, violated, tolerance):
        report = _report(method, s, n, r, t, violated=bool(v), nonfinite_input=not finite)
        failure_cotangent(report, np.zeros(1), name, policy, contraction=contraction)


def _traced(*trees: Any) -> bool:
    """Whether any leaf is a tracer (under ``jax.jit``, ``jax.vmap``, ...)."""
    return any(isinstance(leaf, jax.core.Tracer) for tree in trees for leaf in jax.tree_util.tree_leaves(tree))


def _wide(dtype: Any) -> Any:
    """The dtype norms are accumulated in: float32 for the half precisions."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype


def _check_backward(backward: object) -> AdjointMethod:
    check_instance(backward, "backward")
    if not isinstance(backward, AdjointMethod):
        names = ", ".join(m.__name__ for m in ADJOINT_METHODS)
        msg = (
            f"backward={backward!r} is not an adjoint method of rbp-core; the JAX adapter takes {names} "
            "(BPTT, TBPTT, JFB and PhantomGradient belong to the PyTorch adapter)"
        )
        raise TypeError(msg)
    return backward


def _check_tree(tree: Any, name: str, *, same_dtype: bool = False) -> Any:
    """Every leaf of ``tree`` a floating array (one dtype with ``same_dtype``); returns the first leaf's dtype."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        msg = f"{name} must be a pytree with at least one array leaf, got {tree!r}"
        raise TypeError(msg)
    dtypes = []
    for path, leaf in leaves:
        where = name + jax.tree_util.keystr(path)
        if not hasattr(leaf, "dtype") and not isinstance(leaf, float):
            msg = f"{where} must be a floating array, got {type(leaf).__name__}: {name} must be a pytree of arrays"
            raise TypeError(msg)
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            msg = f"{where} has dtype {dtype}; {name} must hold floating arrays (close over other values in f)"
            raise TypeError(msg)
        dtypes.append((where, dtype))
    if same_dtype and len({d for _, d in dtypes}) > 1:
        listed = ", ".join(f"{w}: {d}" for w, d in dtypes)
        msg = f"{name} must hold arrays of one dtype, got {listed}"
        raise TypeError(msg)
    return dtypes[0][1]


def _check_flags(f: object, throw: object, on_backward_failure: object) -> None:
    if not callable(f):
        msg = f"f must be callable as f(h, params), got {type(f).__name__}"
        raise TypeError(msg)
    if not isinstance(throw, bool):
        msg = f"throw must be True or False, got {throw!r}"
        raise TypeError(msg)
    check_policy(on_backward_failure, "on_backward_failure")


def _check_output(f: Callable[[Any, Any], Any], h0: Any, params: Any, structure: Any) -> None:
    """``f(h0, params)`` has the structure, shapes and dtypes of ``h0`` (checked on shapes only: no evaluation)."""
    out = jax.eval_shape(f, h0, params)
    if jax.tree_util.tree_structure(out) != structure:
        msg = f"f(h, params) returned a pytree of structure {jax.tree_util.tree_structure(out)}; h0 has {structure}"
        raise ValueError(msg)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(out), jax.tree_util.tree_leaves(h0), strict=True):
        where = "f(h, params)" + jax.tree_util.keystr(path)
        if tuple(got.shape) != tuple(jnp.shape(want)) or got.dtype != jnp.result_type(want):
            msg = f"{where} is {got.dtype}{list(got.shape)}; h0's leaf there is {jnp.result_type(want)}{list(jnp.shape(want))}"
            raise ValueError(msg)
