"""Reference losses for dynamic batch loading, from a scaling law fitted per domain.

Sheared LLaMA derives each domain's reference loss by fitting ``L(N) = a / N^b + c`` to a
model family's per-domain losses at several sizes ``N`` (LLaMA2 7B/13B/70B) and evaluating
the fit at the target size. This module does that fit:

* :func:`fit_scaling_law` fits one domain. For a fixed ``b`` the law is linear in ``(a, c)``,
  so those come from closed-form least squares (``a`` clamped at 0 by refitting ``c`` alone);
  ``b`` is found by a 1-D search (a log grid over ``b_range``, golden-section refinement in
  ``ln b``, then Gauss-Newton polishing), all in float64. ``N`` is divided by the sizes'
  geometric mean while fitting; the reported ``a`` is in the units of ``N`` as given, so
  predictions do not depend on the unit chosen for ``N`` (parameters or billions) as long as
  the target is given in the same unit.
* :func:`fit_reference_losses` fits every domain and evaluates at the target size.
* :func:`load_points` reads the per-size losses from JSON files.

Three parameters need at least three distinct sizes: with two points the law is
underdetermined (any ``b`` fits them exactly), which is an error, never a silent guess.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shear.errors import ShearError

#: Default search range of the exponent ``b``.
B_RANGE = (1e-3, 2.0)
_GRID = 241  # log-spaced grid points over B_RANGE before the refinement


@dataclass(frozen=True)
class ScalingFit:
    """A fitted law ``L(N) = a / N^b + c``.

    Attributes:
        a: the scale, in the units of ``N`` that were fitted (``a >= 0``).
        b: the exponent (``b > 0``; meaningless when ``a == 0``).
        c: the loss as ``N`` goes to infinity (the irreducible loss).
        rms: root mean square of the fit's residuals on the fitted points.
        n_points: how many points were fitted.
        scale: the geometric mean of the fitted sizes (``N`` was divided by it while fitting).
    """

    a: float
    b: float
    c: float
    rms: float
    n_points: int
    scale: float = 1.0

    def predict(self, n: float) -> float:
        """The fitted loss at size ``n``.

        Args:
            n: model size, in the same units as the fitted sizes (positive, finite).

        Returns:
            ``a / n^b + c``.

        Raises:
            ShearError: ``n`` is not a positive finite number.
        """
        n = _positive(n, "size")
        if self.a == 0.0:
            return self.c
        # (a * scale^-b) * (n / scale)^-b, in log space: no overflow of scale^b or n^b
        return math.exp(math.log(self.a) - self.b * math.log(n)) + self.c

    def __call__(self, n: float) -> float:
        """Same as :meth:`predict`."""
        return self.predict(n)

    def to_dict(self) -> dict[str, float]:
        """``{"a", "b", "c", "rms"}`` as plain floats (JSON-ready)."""
        return {"a": self.a, "b": self.b, "c": self.c, "rms": self.rms}


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ShearError(f"{what} must be a number, got {value!r}")
    return float(value)


def _positive(value: Any, what: str) -> float:
    v = _number(value, what)
    if not math.isfinite(v) or v <= 0:
        raise ShearError(f"{what} must be a positive finite number, got {value!r}")
    return v


def _linear(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least-squares ``y ~ a x + c`` with ``a >= 0``; returns ``(a, c, sse)``."""
    n = len(x)
    xm = math.fsum(x) / n
    ym = math.fsum(y) / n
    sxx = math.fsum((xi - xm) ** 2 for xi in x)
    sxy = math.fsum((xi - xm) * (yi - ym) for xi, yi in zip(x, y, strict=True))
    a = sxy / sxx if sxx > 0 else 0.0
    if not a > 0:  # the constraint a >= 0 is active: c alone, the mean
        a, c = 0.0, ym
    else:
        c = ym - a * xm
    sse = math.fsum((a * xi + c - yi) ** 2 for xi, yi in zip(x, y, strict=True))
    return a, c, sse


def _solve3(m: list[list[float]], v: list[float]) -> list[float] | None:
    """Solve a 3x3 system by Gaussian elimination with partial pivoting (None if singular)."""
    a = [row[:] + [vi] for row, vi in zip(m, v, strict=True)]
    for col in range(3):
        piv = max(range(col, 3), key=lambda r: abs(a[r][col]))
        if abs(a[piv][col]) < 1e-300:
            return None
        a[col], a[piv] = a[piv], a[col]
        for r in range(col + 1, 3):
            f = a[r][col] / a[col][col]
            for k in range(col, 4):
                a[r][k] -= f * a[col][k]
    out = [0.0, 0.0, 0.0]
    for r in (2, 1, 0):
        out[r] = (a[r][3] - sum(a[r][k] * out[k] for k in range(r + 1, 3))) / a[r][r]
    return out


def fit_scaling_law(
    params: Sequence[float],
    losses: Sequence[float],
    b_range: tuple[float, float] = B_RANGE,
) -> ScalingFit:
    """Fit ``L(N) = a / N^b + c`` (``a >= 0``, ``b`` in ``b_range``, ``c`` free) by least squares.

    Args:
        params: model sizes ``N`` (any unit: parameters, billions; positive and finite).
            Repeated sizes are allowed (repeated measurements), but at least 3 must differ.
        losses: the loss at each size (finite).
        b_range: the interval searched for the exponent ``b`` (``0 < low < high``).

    Returns:
        The fit; its ``a`` is in the units of ``params``.

    Raises:
        ShearError: mismatched lengths, a non-finite or non-positive size, a non-finite loss,
            fewer than 3 distinct sizes, or a bad ``b_range``.
    """
    if isinstance(params, (str, bytes)) or isinstance(losses, (str, bytes)):
        raise ShearError("params and losses must be sequences of numbers")
    ns = [_positive(v, "a model size") for v in params]
    ys = [_number(v, "a loss") for v in losses]
    if len(ns) != len(ys):
        raise ShearError(f"got {len(ns)} sizes but {len(ys)} losses: give one loss per size")
    bad = [v for v in ys if not math.isfinite(v)]
    if bad:
        raise ShearError(f"losses must be finite, got {bad}")
    distinct = sorted(set(ns))
    if len(distinct) < 3:
        raise ShearError(
            f"fitting L(N) = a / N^b + c needs losses at >= 3 distinct sizes, got {len(distinct)} "
            f"({distinct}): with fewer points the 3-parameter law is underdetermined"
        )
    lo, hi = (_positive(v, "b_range bound") for v in b_range)
    if not lo < hi:
        raise ShearError(f"b_range must be (low, high) with low < high, got {b_range}")

    n = len(ns)
    scale = math.exp(math.fsum(math.log(v) for v in ns) / n)
    t = [math.log(v / scale) for v in ns]

    def project(b: float) -> tuple[float, float, float]:
        return _linear([math.exp(-b * ti) for ti in t], ys)

    # 1. log grid over b
    ulo, uhi = math.log(lo), math.log(hi)
    us = [ulo + (uhi - ulo) * i / (_GRID - 1) for i in range(_GRID)]
    sses = [project(math.exp(u))[2] for u in us]
    k = min(range(_GRID), key=sses.__getitem__)
    best_u, best_sse = us[k], sses[k]

    # 2. golden-section refinement of ln b between the grid neighbours
    left, right = us[max(k - 1, 0)], us[min(k + 1, _GRID - 1)]
    g = (math.sqrt(5) - 1) / 2
    x1, x2 = right - g * (right - left), left + g * (right - left)
    f1, f2 = project(math.exp(x1))[2], project(math.exp(x2))[2]
    for _ in range(200):
        if right - left < 1e-13:
            break
        if f1 <= f2:
            right, x2, f2 = x2, x1, f1
            x1 = right - g * (right - left)
            f1 = project(math.exp(x1))[2]
        else:
            left, x1, f1 = x1, x2, f2
            x2 = left + g * (right - left)
            f2 = project(math.exp(x2))[2]
    for u, f in ((x1, f1), (x2, f2)):
        if f < best_sse:
            best_u, best_sse = u, f
    b = math.exp(best_u)
    a, c, sse = project(b)

    # 3. Gauss-Newton polishing of (a, b, c), re-projecting (a, c) at each new b
    for _ in range(50):
        if a <= 0 or sse == 0.0:
            break
        e = [math.exp(-b * ti) for ti in t]
        r = [a * ei + c - yi for ei, yi in zip(e, ys, strict=True)]
        jac = [(ei, -a * ti * ei, 1.0) for ei, ti in zip(e, t, strict=True)]
        jtj = [[math.fsum(row[i] * row[j] for row in jac) for j in range(3)] for i in range(3)]
        jtr = [-math.fsum(row[i] * ri for row, ri in zip(jac, r, strict=True)) for i in range(3)]
        step = _solve3(jtj, jtr)
        if step is None or not all(math.isfinite(s) for s in step):
            break
        nb = min(max(b + step[1], lo), hi)
        na, nc, nsse = project(nb)
        # near the minimum the SSE is flat to rounding: accept a step that does not raise it
        # beyond that, and stop on the step size (the fixed point of GN is a stationary point)
        if not nsse <= sse * (1 + 1e-12):
            break
        done = abs(nb - b) <= 1e-15 * b
        a, b, c, sse = na, nb, nc, nsse
        if done:
            break

    return ScalingFit(
        a=a * scale**b if a > 0 else 0.0,
        b=b,
        c=c,
        rms=math.sqrt(sse / n),
        n_points=n,
        scale=scale,
    )


def _size_key(value: Any, where: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ShearError(f"{where}: size {value!r} is not a number") from None
    return _positive(value, f"{where}: a model size")


def _table(points: Any) -> tuple[list[float], dict[str, dict[float, float]]]:
    """Normalise either input form into ``(sorted sizes, {domain: {size: loss}})``."""
    table: dict[str, dict[float, float]] = {}
    if isinstance(points, Mapping):
        if not points:
            raise ShearError("no losses to fit: the mapping of domains is empty")
        for domain, by_size in points.items():
            if not isinstance(by_size, Mapping):
                raise ShearError(f"domain {domain!r}: expected a mapping {{size: loss}}, got {by_size!r}")
            row: dict[float, float] = {}
            for size, loss in by_size.items():
                s = _size_key(size, f"domain {domain!r}")
                if s in row:
                    raise ShearError(f"domain {domain!r}: size {s:g} is given twice")
                row[s] = _number(loss, f"domain {domain!r} at size {s:g}: the loss")
            table[str(domain)] = row
        sizes = sorted({s for row in table.values() for s in row})
        for domain, row in table.items():
            missing = [s for s in sizes if s not in row]
            if missing:
                raise ShearError(
                    f"domain {domain!r} has no loss at size(s) {[f'{s:g}' for s in missing]}: "
                    "every domain needs a loss at every size"
                )
        return sizes, table

    if isinstance(points, (str, bytes)) or not isinstance(points, Sequence):
        raise ShearError(
            "points must be {domain: {size: loss}} or a list of {'params': N, 'losses': {domain: loss}}"
        )
    if not points:
        raise ShearError("no points to fit: the list is empty")
    seen: dict[float, str] = {}
    rows: list[tuple[float, Mapping[str, Any], str]] = []
    for i, p in enumerate(points):
        where = f"point {i}"
        if isinstance(p, Mapping) and p.get("source"):
            where += f" ({p['source']})"
        if not isinstance(p, Mapping) or "params" not in p or not isinstance(p.get("losses"), Mapping):
            raise ShearError(f"{where}: expected {{'params': N, 'losses': {{domain: loss}}}}, got {p!r}")
        size = _size_key(p["params"], where)
        if size in seen:
            raise ShearError(f"{where}: size {size:g} is also given by {seen[size]}; give each size once")
        seen[size] = where
        if not p["losses"]:
            raise ShearError(f"{where}: no per-domain losses")
        rows.append((size, p["losses"], where))
    domains: list[str] = []
    for _, losses, _ in rows:
        domains.extend(str(d) for d in losses if str(d) not in domains)
    for domain in domains:
        table[domain] = {}
    for size, losses, where in rows:
        named = {str(d): v for d, v in losses.items()}
        for domain in domains:
            if domain not in named:
                raise ShearError(
                    f"domain {domain!r} has no loss at size {size:g} ({where}): "
                    "every domain needs a loss at every size"
                )
            table[domain][size] = _number(named[domain], f"domain {domain!r} at size {size:g}: the loss")
    return sorted(seen), table


def fit_reference_losses(
    points: Mapping[str, Mapping[float, float]] | Sequence[Mapping[str, Any]],
    target_params: float,
    b_range: tuple[float, float] = B_RANGE,
) -> dict[str, Any]:
    """Fit ``L(N) = a / N^b + c`` per domain and evaluate it at the target size.

    Args:
        points: the family's losses, either ``{domain: {size: loss}}`` or a list of
            ``{"params": N, "losses": {domain: loss}}`` (extra keys, e.g. ``source``, are
            ignored), as :func:`load_points` returns. Every domain needs a loss at every size,
            and at least 3 distinct sizes are needed.
        target_params: the target model's size, in the same units as the sizes.
        b_range: the interval searched for each exponent ``b``.

    Returns:
        ``{"reference_losses": {domain: L(target)}, "fits": {domain: {"a", "b", "c", "rms"}},
        "target_params": N, "sizes": [sorted sizes], "warnings": [str]}``. Warnings flag an
        extrapolated target (outside the fitted sizes), a domain whose loss does not decrease
        with size, an exponent at the edge of ``b_range`` and a negative ``c``.

    Raises:
        ShearError: malformed points, a domain missing at some size, non-finite values,
            fewer than 3 sizes, or a bad target size.
    """
    target = _positive(target_params, "the target size")
    sizes, table = _table(points)
    if len(sizes) < 3:
        raise ShearError(
            f"fitting L(N) = a / N^b + c needs losses at >= 3 distinct sizes, got {len(sizes)} "
            f"({[f'{s:g}' for s in sizes]}): with fewer points the 3-parameter law is underdetermined"
        )
    warnings: list[str] = []
    if not sizes[0] <= target <= sizes[-1]:
        warnings.append(
            f"the target size {target:g} lies outside the fitted sizes [{sizes[0]:g}, {sizes[-1]:g}]: "
            "its reference losses are extrapolated"
        )
    refs: dict[str, float] = {}
    fits: dict[str, dict[str, float]] = {}
    for domain, row in table.items():
        ys = [row[s] for s in sizes]
        try:
            fit = fit_scaling_law(sizes, ys, b_range)
        except ShearError as e:
            raise ShearError(f"domain {domain!r}: {e}") from None
        refs[domain] = fit.predict(target)
        fits[domain] = fit.to_dict()
        if fit.a == 0.0:
            warnings.append(
                f"domain {domain!r}: the loss does not decrease with size (the fit is flat at c = "
                f"{fit.c:.4g}); its reference loss is the mean loss"
            )
            continue
        if any(y2 > y1 for y1, y2 in zip(ys, ys[1:], strict=False)):
            warnings.append(
                f"domain {domain!r}: the measured losses do not decrease monotonically with size ({ys})"
            )
        if fit.b <= b_range[0] * (1 + 1e-9) or fit.b >= b_range[1] * (1 - 1e-9):
            warnings.append(
                f"domain {domain!r}: the exponent b = {fit.b:.4g} is at the edge of the searched range "
                f"{tuple(b_range)}"
            )
        if fit.c < 0:
            warnings.append(
                f"domain {domain!r}: the fitted loss at infinite size c = {fit.c:.4g} is negative; "
                "the law fits these points poorly"
            )
    return {
        "reference_losses": refs,
        "fits": fits,
        "target_params": target,
        "sizes": sizes,
        "warnings": warnings,
    }


def _point(obj: Any, where: str, params: float | None) -> dict[str, Any]:
    """One point from ``{"params", "losses"}`` or from ``shear eval --json`` output."""
    if not isinstance(obj, Mapping):
        raise ShearError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("losses"), Mapping):
        raw = obj["losses"]
    elif isinstance(obj.get("domains"), Mapping):  # shear eval --json
        raw = obj["domains"]
    else:
        raise ShearError(
            f"{where}: expected {{'params': N, 'losses': {{domain: loss}}}}, the output of "
            "`shear eval --json` ({'domains': {domain: {'loss': ...}}}), or {'points': [...]}"
        )
    losses: dict[str, float] = {}
    for domain, v in raw.items():
        if isinstance(v, Mapping):
            if "loss" not in v:
                raise ShearError(f"{where}: domain {domain!r} has no 'loss'")
            v = v["loss"]
        losses[str(domain)] = _number(v, f"{where}: the loss of domain {domain!r}")
    if not losses:
        raise ShearError(f"{where}: no per-domain losses")
    if params is None:
        if "params" not in obj:
            raise ShearError(
                f"{where}: per-domain losses but no 'params' (the model's parameter count): "
                "add it to the file or pass it"
            )
        params = obj["params"]
    return {"params": _positive(params, f"{where}: 'params'"), "losses": losses, "source": where}


def load_points(
    files: Sequence[str | Path],
    params: Sequence[float | None] | None = None,
) -> list[dict[str, Any]]:
    """Read per-size, per-domain losses from JSON files.

    Each file holds one of:

    * ``{"params": N, "losses": {domain: loss}}`` (a loss may also be ``{"loss": x, ...}``);
    * the output of ``shear eval --json`` (``{"domains": {domain: {"loss": x, ...}}, ...}``),
      with a ``params`` key (the model's parameter count) or its size passed in ``params``;
    * ``{"points": [...]}`` or a JSON list, of either of the above.

    Args:
        files: the JSON files.
        params: optional sizes, one per file (``None`` to read it from the file); it supplies
            or overrides the ``params`` of a single-point file (not allowed for a file with
            several points).

    Returns:
        A list of ``{"params": N, "losses": {domain: loss}, "source": "file[#i]"}``, ready
        for :func:`fit_reference_losses`.

    Raises:
        ShearError: a missing or unreadable file, invalid JSON, an unrecognised layout, a
            point without a size, or ``params`` of the wrong length.
    """
    if isinstance(files, (str, Path)):
        files = [files]
    if params is not None and len(params) != len(files):
        raise ShearError(f"got {len(params)} sizes for {len(files)} files: give one per file (or None)")
    if not files:
        raise ShearError("no files to read points from")
    out: list[dict[str, Any]] = []
    for i, f in enumerate(files):
        path = Path(f)
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise ShearError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ShearError(f"{path}: cannot read it ({e})") from None
        except json.JSONDecodeError as e:
            raise ShearError(f"{path}: not valid JSON ({e})") from None
        size = None if params is None else params[i]
        many = obj.get("points") if isinstance(obj, Mapping) else obj
        if isinstance(many, list):
            if size is not None:
                raise ShearError(f"{path}: holds several points; give their sizes in the file, not per file")
            if not many:
                raise ShearError(f"{path}: the list of points is empty")
            out.extend(_point(p, f"{path}#{j}", None) for j, p in enumerate(many))
        else:
            out.append(_point(obj, str(path), size))
    return out
