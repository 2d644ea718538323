"""Declarative weight mapping: tables of `Rule`s turn a checkpoint's names into ours.

A rule names one of our parameters and the source tensor(s) it is made from, with
`{i}`-style placeholders that match integers. Example:

    Rule("blocks.{i}.x.attn.qkv.weight",
         ("transformer_blocks.{i}.attn.to_q.weight",
          "transformer_blocks.{i}.attn.to_k.weight",
          "transformer_blocks.{i}.attn.to_v.weight"), concat)

`apply_rules` expands every rule over the checkpoint's keys and reports, naming the file
and layout, every source key no rule consumed. `check_against_model` reports missing and
mis-shaped parameters before anything is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import WeightMappingError

Transform = Callable[..., mx.array]
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


# ---- transforms (all lazy: shapes are known without reading data) ----
def identity(x: mx.array) -> mx.array:
    return x


def concat(*xs: mx.array) -> mx.array:
    """Fuse separate q, k, v projections into one (order as given)."""
    return mx.concatenate(xs, axis=0)


def conv_to_nhwc(w: mx.array) -> mx.array:
    """PyTorch conv weight (O, I, kH, kW) -> MLX (O, kH, kW, I)."""
    return w.transpose(0, 2, 3, 1)


def swap_halves(w: mx.array) -> mx.array:
    """diffusers' AdaLayerNormContinuous stores (scale, shift); SAI and we use (shift, scale)."""
    a, b = mx.split(w, 2, axis=0)
    return mx.concatenate([b, a], axis=0)


def squeeze_1x1(w: mx.array) -> mx.array:
    """A 1x1 conv weight (O, I, 1, 1) used as a Linear (O, I)."""
    return w.reshape(w.shape[0], w.shape[1]) if w.ndim == 4 else w


@dataclass(frozen=True)
class Rule:
    """One of our parameters and where it comes from.

    sources: source key patterns fed to `transform` in order.
    aliases: further source tuples tried when `sources` is absent (e.g. T5's two embedding
        names); when several are present the first wins and the others count as consumed.
    when: optional predicate on (placeholder values, all source keys) to select a rule, e.g.
        only for the last block.
    rename: optional map of placeholder values before the target is formatted (index reversal).
    """

    target: str
    sources: Tuple[str, ...]
    transform: Transform = identity
    aliases: Tuple[Tuple[str, ...], ...] = ()
    when: Optional[Callable[[Dict[str, str], frozenset], bool]] = None
    rename: Optional[Callable[[Dict[str, str]], Dict[str, str]]] = None

    def alternatives(self) -> Tuple[Tuple[str, ...], ...]:
        return (self.sources,) + self.aliases


def same(*names: str) -> Tuple[Rule, ...]:
    """Rules for parameters whose names are identical in source and target."""
    return tuple(Rule(n, (n,)) for n in names)


def prefixed(rules: Iterable[Rule], target_prefix: str, source_prefix: str) -> Tuple[Rule, ...]:
    """The same rules under other prefixes (e.g. per encoder inside a single file)."""

    def sp(s: Tuple[str, ...]) -> Tuple[str, ...]:
        return tuple(source_prefix + x for x in s)

    return tuple(
        Rule(target_prefix + r.target, sp(r.sources), r.transform,
             tuple(sp(a) for a in r.aliases), r.when, r.rename)
        for r in rules
    )  # fmt: skip


_REGEX_CACHE: Dict[str, re.Pattern] = {}


def _regex(pattern: str) -> re.Pattern:
    if pattern not in _REGEX_CACHE:
        parts = _PLACEHOLDER.split(pattern)
        out = []
        for i, part in enumerate(parts):
            out.append(f"(?P<{part}>\\d+)" if i % 2 else re.escape(part))
        _REGEX_CACHE[pattern] = re.compile("".join(out) + r"\Z")
    return _REGEX_CACHE[pattern]


def _describe(files: Sequence[str]) -> str:
    return ", ".join(str(f) for f in files) if files else "<in memory>"


def _short_list(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def apply_rules(
    tensors: Mapping[str, mx.array],
    rules: Sequence[Rule],
    *,
    layout: str,
    files: Sequence[str] = (),
    prefix: str = "",
    ignore: Sequence[str] = (),
) -> Dict[str, mx.array]:
    """Map every key under `prefix` through `rules`; raise on keys nothing consumed.

    `ignore`: regexes of source keys (after the prefix) that are known and unused.
    """
    keys = {k[len(prefix):]: k for k in tensors if k.startswith(prefix)}
    key_set = frozenset(keys)
    consumed: set = set()
    out: Dict[str, mx.array] = {}
    incomplete: list = []
    for rule in rules:
        done_groups: set = set()
        for alt in rule.alternatives():
            rx = _regex(alt[0])
            for key in keys:
                m = rx.match(key)
                if not m:
                    continue
                groups = m.groupdict()
                gkey = tuple(sorted(groups.items()))
                if rule.when is not None and not rule.when(groups, key_set):
                    continue
                names = [s.format(**groups) for s in alt]
                if gkey in done_groups:  # a duplicate under another name
                    consumed.update(n for n in names if n in keys)
                    continue
                missing = [n for n in names if n not in keys]
                if missing:
                    incomplete.append((rule.target.format(**groups), missing))
                    continue
                target_groups = rule.rename(groups) if rule.rename else groups
                out[rule.target.format(**target_groups)] = rule.transform(
                    *(tensors[keys[n]] for n in names)
                )
                consumed.update(names)
                done_groups.add(gkey)
    ignored = {k for k in keys if any(re.match(p, k) for p in ignore)}
    unexpected = set(keys) - consumed - ignored
    problems = []
    if incomplete:
        problems.append(
            "incomplete source tensors: "
            + "; ".join(f"{t} needs {', '.join(prefix + m for m in ms)}" for t, ms in incomplete[:12])
        )
    if unexpected:
        problems.append(f"unexpected keys: {_short_list(prefix + k for k in unexpected)}")
    if problems:
        raise WeightMappingError(
            f"{_describe(files)} (layout assumed: {layout}): " + "; ".join(problems)
            + ". Is this the right file for this component, and is it complete?"
        )
    return out


def check_against_model(
    model, weights: Mapping[str, mx.array], *, layout: str, files: Sequence[str] = ()
) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped parameter."""
    expected = dict(tree_flatten(model.parameters()))
    missing = set(expected) - set(weights)
    unexpected = set(weights) - set(expected)
    shapes = [
        f"{k}: file {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if tuple(weights[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short_list(unexpected)}")
    if shapes:
        problems.append("wrong shapes: " + "; ".join(shapes[:12]))
    if problems:
        raise WeightMappingError(
            f"{_describe(files)} (layout assumed: {layout}): " + "; ".join(problems)
            + ". The checkpoint does not match the network configuration; check the model "
            "variant or let sd35_mlx infer the configuration from the file."
        )


def cast_floating(weights: Dict[str, mx.array], dtype: Optional[mx.Dtype]) -> Dict[str, mx.array]:
    if dtype is None:
        return weights
    return {
        k: (v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()
    }


def load_into(
    model,
    weights: Dict[str, mx.array],
    *,
    layout: str,
    files: Sequence[str] = (),
    dtype: Optional[mx.Dtype] = None,
):
    """Check, cast and load `weights` (our names) into `model`; returns the model."""
    check_against_model(model, weights, layout=layout, files=files)
    model.load_weights(list(cast_floating(weights, dtype).items()), strict=True)
    return model


@dataclass(frozen=True)
class NetworkLayout:
    """How one network is stored in one checkpoint layout."""

    name: str  # shown in errors, e.g. "diffusers transformer/"
    rules: Tuple[Rule, ...]
    prefix: str = ""  # source keys outside it belong to other networks
    ignore: Tuple[str, ...] = ()  # regexes of known, unused source keys

    def with_prefix(self, prefix: str, name: Optional[str] = None) -> "NetworkLayout":
        return NetworkLayout(name or self.name, self.rules, prefix, self.ignore)

    def owns(self, keys: Iterable[str]) -> bool:
        """Whether any key of a checkpoint belongs to this layout (by its first rule)."""
        rx = [_regex(alt[0]) for r in self.rules for alt in r.alternatives()]
        return any(
            k.startswith(self.prefix) and any(x.match(k[len(self.prefix):]) for x in rx)
            for k in keys
        )


def load_network(
    tensors: Mapping[str, mx.array],
    layout: NetworkLayout,
    build: Callable[[object], object],
    infer_config: Callable[[Mapping[str, mx.array]], object],
    *,
    files: Sequence[str] = (),
    dtype: Optional[mx.Dtype] = None,
    config: object = None,
):
    """Map, infer the config (unless given), build and load one network."""
    weights = apply_rules(
        tensors, layout.rules, layout=layout.name, files=files, prefix=layout.prefix,
        ignore=layout.ignore,
    )  # fmt: skip
    if config is None:
        config = infer_config(weights)
    model = build(config)
    return load_into(model, weights, layout=layout.name, files=files, dtype=dtype)
