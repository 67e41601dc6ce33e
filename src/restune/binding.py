"""How tuners are bound to frozen operations at run time: forward hooks, never a wrapper module.

Each hooked module gets one *host* that adds the active set's tuner outputs to what the module computed. Because the
frozen modules are neither replaced nor wrapped, their state-dict names stay timm's, ``forward_features`` and the
user's own loop keep working, and disabling the tuners is a flag, not a model surgery.

- ``ModuleHost`` (parallel, weight-delta and affine tuners): affine-before transforms of the input, then
  out + sum_k t_k(x) (a tuner on a virtual q/k/v site adds to its row block of the fused qkv only), then
  affine-after transforms of the result.
- ``AttentionHost`` (attention-branch tuners): captures the backbone's own query from ``qkv`` (before any tuner
  delta), and adds s * P W_o. What one attention call captures lives in a frame that a pre-hook opens and an
  ``always_call`` hook closes, so an exception inside the attention leaves nothing stale for the next call. When s
  is one number and ``proj`` carries no tuner, the branch is added to the input of ``proj`` so the backbone's W_o
  product is shared (exact, as W_o is linear); otherwise it is projected through the frozen W_o separately and added
  to the attention output. Tuners that join the softmax (classic prefix tuning)
  replace the input of ``proj`` with attention over their keys and values concatenated before the backbone's (the
  q, k, v it uses are those the attention computed, tuner deltas included).
- ``TokenHost`` (token tuners, VPT): puts prompt tokens after the prefix tokens before the first tuned block,
  replaces them before each later tuned block, and takes them out after the final ``norm``, so ``forward_features``
  returns the usual sequence.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from restune.contract import Binding, Tuner

__all__ = ["TunerStore", "TunerSet", "ModuleHost", "AttentionHost", "TokenHost"]


class TunerSet(nn.Module):
    """One named set of tuners: a module tree mirroring the site names, plus what the set owns of the model.

    Attributes:
        tuners: tuner modules at ``<site name>.<tuner type>`` (e.g. ``blocks.0.mlp.res_adapter``).
        spec: the resolved spec the set was built from (saved with its checkpoint).
        trains_head: whether the set trains its own copy of the classifier head.
        backbone_names: backbone parameters this set trains (their values are swapped in when it is active).
    """

    def __init__(self, spec: Any, trains_head: bool, backbone_names: list[str]) -> None:
        super().__init__()
        self.tuners = nn.Module()
        self.spec = spec
        self.trains_head = trains_head
        self.backbone_names = backbone_names
        self.__dict__["backbone_values"] = {}  # name -> tensor while the set is inactive; hidden from state_dict

    def add(self, site_name: str, tuner_type: str, module: Tuner) -> str:
        """Place a tuner in the tree and return its dotted key inside ``tuners``."""
        node = self.tuners
        for part in site_name.split("."):
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        name, index = tuner_type, 1
        while hasattr(node, name):
            name, index = f"{tuner_type}_{index}", index + 1
        node.add_module(name, module)
        return f"{site_name}.{name}"

    def named_tuners(self) -> list[tuple[str, Tuner]]:
        """(key, tuner) pairs in attachment order."""
        return [(name, module) for name, module in self.tuners.named_modules() if isinstance(module, Tuner)]


class TunerStore(nn.Module):
    """Everything restune adds to a model, under ``model.restune``: the tuner sets and the hooks' shared state."""

    def __init__(self) -> None:
        super().__init__()
        self.sets = nn.ModuleDict()
        self.active: str | None = None
        self.enabled = True
        # (module, host kind) -> host. Keyed by the module itself, not its id(), so that copy.deepcopy of the model
        # (which copies the keys through its memo) maps the copy's modules to the copy's hosts.
        self.__dict__["hosts"] = {}
        self.__dict__["original_head"] = None  # a hidden copy of the head as it was before the first tune
        self.__dict__["original_backbone"] = {}  # name -> tensor as it was before any set trained it

    def active_entries(self, host: ModuleHost | AttentionHost) -> list:
        if not self.enabled or self.active is None:
            return []
        return host.entries.get(self.active, [])

    def host(self, module: nn.Module, kind: type) -> Any:
        key = (module, kind)
        if key not in self.hosts:
            self.hosts[key] = kind(self, module)
        return self.hosts[key]

    def output_entries(self, module: nn.Module) -> list:
        """Tuners of the active set that change a module's output (additive or affine-after)."""
        host = self.hosts.get((module, ModuleHost))
        return host._active(host.entries) + host._active(host.after) if host is not None else []

    def detach_hooks(self) -> None:
        """Remove every hook from the frozen modules (the hosts and their tables are kept for ``attach_hooks``)."""
        for host in self.hosts.values():
            host.detach()

    def attach_hooks(self) -> None:
        """Register the hosts' hooks again, in their original order."""
        for host in self.hosts.values():
            host.attach()


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _without(table: dict[str, list], ids: set[int]) -> dict[str, list]:
    """A host table without the given tuners (entries are tuners or (tuner, rows) pairs)."""

    def kept(entry: Any) -> bool:
        return id(entry[0] if isinstance(entry, tuple) else entry) not in ids

    return {name: [e for e in entries if kept(e)] for name, entries in table.items()}


def _swap_tables(host: Any, names: tuple[str, ...], ids: set[int]) -> Callable[[], None]:
    """Drop tuners from a host's tables; the returned function puts the tables back as they were."""
    saved = {name: getattr(host, name) for name in names}
    for name, table in saved.items():
        setattr(host, name, _without(table, ids))

    def restore() -> None:
        for name, table in saved.items():
            setattr(host, name, table)

    return restore


class ModuleHost:
    """Runs the tuners bound to one frozen module, in a fixed order whatever order they were attached in.

    1. ``before`` affine tuners transform the module's input (ARC-style);
    2. the module runs; observers see its untouched output (the attention branch's query capture);
    3. parallel and weight-delta tuners add their outputs, computed from the (transformed) input; a tuner on a
       virtual q/k/v site adds to its row block only;
    4. ``after`` affine and sequential tuners transform the result (SSF, NOAH's adapter).
    """

    def __init__(self, store: TunerStore, module: nn.Module) -> None:
        self.store = store
        self.entries: dict[str, list[tuple[Tuner, tuple[int, int] | None]]] = {}
        self.before: dict[str, list[Tuner]] = {}
        self.after: dict[str, list[Tuner]] = {}
        self.observers: list[Any] = []
        self.module = module
        self.handles: list[RemovableHandle] = []
        self.attach()

    def attach(self) -> None:
        self.handles = [
            self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            self.module.register_forward_hook(self._hook, with_kwargs=True),
        ]

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def unregister(self, tuners: list[Tuner]) -> Callable[[], None]:
        """Stop running these tuners here; call the returned function to run them again."""
        return _swap_tables(self, ("entries", "before", "after"), {id(t) for t in tuners})

    def add(self, set_name: str, tuner: Tuner, rows: tuple[int, int] | None) -> None:
        if tuner.binding in (Binding.AFFINE, Binding.SEQUENTIAL):
            side = self.before if tuner.position == "before" else self.after
            side.setdefault(set_name, []).append(tuner)
        else:
            self.entries.setdefault(set_name, []).append((tuner, rows))

    def _active(self, table: dict[str, list]) -> list:
        if not self.store.enabled or self.store.active is None:
            return []
        return table.get(self.store.active, [])

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        transforms = self._active(self.before)
        if not transforms:
            return None
        if args:
            x = args[0]
            for tuner in transforms:
                x = tuner(x)
            return (x, *args[1:]), kwargs
        key = next(iter(kwargs))
        x = kwargs[key]
        for tuner in transforms:
            x = tuner(x)
        return args, {**kwargs, key: x}

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        for observe in self.observers:
            observe(output)
        entries, after = self._active(self.entries), self._active(self.after)
        if not entries and not after:
            return None
        if entries:
            output = self._add(_first_input(args, kwargs), output, entries)
        for tuner in after:
            output = tuner(output)
        return output

    @staticmethod
    def _add(x: torch.Tensor, output: torch.Tensor, entries: list) -> torch.Tensor:
        by_rows: dict[tuple[int, int], torch.Tensor] = {}
        transformed: dict[int, torch.Tensor] = {}  # one application per shared input transform (one dropout mask)
        for tuner, rows in entries:
            transform = tuner.input_transform
            if transform is None:
                delta = tuner(x)
            else:
                if id(transform) not in transformed:
                    transformed[id(transform)] = transform(x)
                delta = tuner(transformed[id(transform)])
            if rows is None:
                output = output + delta
            else:
                by_rows[rows] = by_rows[rows] + delta if rows in by_rows else delta
        if by_rows:
            pieces, start = [], 0
            for (lo, hi), delta in sorted(by_rows.items()):
                if lo > start:
                    pieces.append(output[..., start:lo])
                pieces.append(output[..., lo:hi] + delta)
                start = hi
            if start < output.shape[-1]:
                pieces.append(output[..., start:])
            output = torch.cat(pieces, dim=-1)
        return output


class AttentionHost:
    """Adds attention-branch tuners (Res-Prefix, Res-Prompt, prefix tuning) to a timm ``Attention``'s computation."""

    def __init__(self, store: TunerStore, attention: nn.Module) -> None:
        self.store = store
        self.attention = attention
        self.entries: dict[str, list[Tuner]] = {}
        self._query: torch.Tensor | None = None
        self._qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._injected = False
        store.host(attention.qkv, ModuleHost).observers.append(self._capture_query)
        self.handles: list[RemovableHandle] = []
        self.attach()

    def attach(self) -> None:
        # Registered after the qkv host's own hook, so it sees qkv's output with the tuner deltas added.
        self.handles = [
            self.attention.register_forward_pre_hook(self._open_frame),
            self.attention.qkv.register_forward_hook(self._capture_qkv),
            self.attention.proj.register_forward_pre_hook(self._inject),
            self.attention.register_forward_hook(self._add_after, always_call=True),
        ]

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def add(self, set_name: str, tuner: Tuner) -> None:
        self.entries.setdefault(set_name, []).append(tuner)

    def unregister(self, tuners: list[Tuner]) -> Callable[[], None]:
        """Stop running these tuners here; call the returned function to run them again."""
        return _swap_tables(self, ("entries",), {id(t) for t in tuners})

    def _open_frame(self, attention: nn.Module, args: tuple) -> None:
        """Start one attention call with nothing captured (whatever an interrupted call left is dropped)."""
        self._query, self._qkv, self._injected = None, None, False

    def _split_heads(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attention = self.attention
        width = output.shape[-1] // 3
        q, k, v = output.unflatten(-1, (3, attention.num_heads, width // attention.num_heads)).permute(2, 0, 3, 1, 4)
        return attention.q_norm(q), attention.k_norm(k), v

    def _capture_query(self, output: torch.Tensor) -> None:
        if any(not tuner.joins_softmax for tuner in self.store.active_entries(self)):
            attention = self.attention
            width = output.shape[-1] // 3
            query = output[..., :width].unflatten(-1, (attention.num_heads, width // attention.num_heads))
            self._query = attention.q_norm(query.transpose(1, 2))

    def _capture_qkv(self, qkv: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if any(tuner.joins_softmax for tuner in self.store.active_entries(self)):
            self._qkv = self._split_heads(output)

    def _joined_attention(self, tuners: list[Tuner]) -> torch.Tensor:
        """Attention over [tuner keys; backbone keys] (and values), in the layout ``proj`` reads."""
        if self._qkv is None:
            raise RuntimeError(f"{type(self.attention).__name__}: q, k, v were not captured; was qkv bypassed?")
        attention = self.attention
        q, k, v = self._qkv
        batch, heads, tokens, head_dim = q.shape
        keys, values = [], []
        for tuner in tuners:
            extra_k, extra_v = tuner.keys_values(attention)
            keys.append(extra_k.to(q.dtype).view(1, -1, heads, head_dim).transpose(1, 2).expand(batch, -1, -1, -1))
            values.append(extra_v.to(q.dtype).view(1, -1, heads, head_dim).transpose(1, 2).expand(batch, -1, -1, -1))
        drop = attention.attn_drop.p if attention.training and isinstance(attention.attn_drop, nn.Dropout) else 0.0
        out = F.scaled_dot_product_attention(
            q, torch.cat([*keys, k], dim=2), torch.cat([*values, v], dim=2), dropout_p=drop
        )
        return attention.norm(out.transpose(1, 2).reshape(batch, tokens, heads * head_dim))

    def _can_share_projection(self) -> bool:
        drop = self.attention.proj_drop
        dropping = isinstance(drop, nn.Dropout) and drop.p > 0 and drop.training
        return not dropping and not self.store.output_entries(self.attention.proj)

    def _inject(self, proj: nn.Module, args: tuple) -> tuple | None:
        entries = self.store.active_entries(self)
        joined = [tuner for tuner in entries if tuner.joins_softmax]
        branches = [tuner for tuner in entries if not tuner.joins_softmax]
        x = self._joined_attention(joined) if joined else args[0]
        self._qkv = None
        share = branches and self._query is not None and self._can_share_projection()
        if share and all(tuner.scale.is_scalar for tuner in branches):
            for tuner in branches:
                x = x + tuner.scale(tuner.branch(self._query, self.attention))
            self._injected = True
        return (x, *args[1:]) if joined or self._injected else None

    def _add_after(self, attention: nn.Module, args: tuple, output: torch.Tensor | None) -> torch.Tensor | None:
        """Close the call's frame and add the branches not already injected before ``proj``.

        Runs even when the attention raised (``always_call``); ``output`` is None then and only the frame is closed.
        """
        query, injected = self._query, self._injected
        self._query, self._qkv, self._injected = None, None, False
        if output is None:
            return None
        branches = [tuner for tuner in self.store.active_entries(self) if not tuner.joins_softmax]
        if not branches or injected:
            return None
        if query is None:
            raise RuntimeError(f"{type(attention).__name__}: the query was not captured; was qkv bypassed?")
        for tuner in branches:
            branch = F.linear(tuner.branch(query, attention), attention.proj.weight)
            output = output + tuner.scale(branch)
        return output


class TokenHost:
    """Runs the token tuners (VPT) of a timm ``VisionTransformer``.

    Before the first block that carries a token tuner of the active set, its tokens go in after the model's prefix
    tokens (the class token); before each later such block, the tokens at those positions are replaced by that
    block's own (VPT-deep). A hook on the final ``norm`` takes them out again (LayerNorm is per token, so removing
    them after it equals removing them before), so ``forward_features`` and everything after it see the usual shape.
    """

    def __init__(self, store: TunerStore, model: nn.Module) -> None:
        self.store = store
        self.model = model
        self.entries: dict[str, dict[int, Tuner]] = {}
        self._inserted = 0  # prompt tokens in the sequence of the forward pass now running
        self.handles: list[RemovableHandle] = []
        self.attach()

    def attach(self) -> None:
        self.handles = [
            block.register_forward_pre_hook(functools.partial(self._before_block, index))
            for index, block in enumerate(self.model.blocks)
        ]
        # Always called, so a norm that raises still clears the count; the first tuned block of every forward sets it
        # afresh in any case, so an exception anywhere leaves nothing the next forward reads.
        self.handles.append(self.model.norm.register_forward_hook(self._after_norm, always_call=True))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def unregister(self, tuners: list[Tuner]) -> Callable[[], None]:
        """Stop running these tuners here; call the returned function to run them again."""
        ids = {id(t) for t in tuners}
        saved = self.entries
        self.entries = {name: {i: t for i, t in table.items() if id(t) not in ids} for name, table in saved.items()}

        def restore() -> None:
            self.entries = saved

        return restore

    def add(self, set_name: str, tuner: Tuner, layer: int) -> None:
        table = self.entries.setdefault(set_name, {})
        if layer in table:
            raise ValueError(f"tuner set {set_name!r} has two token tuners on blocks.{layer}; use one per block")
        table[layer] = tuner

    def _active(self) -> dict[int, Tuner]:
        if not self.store.enabled or self.store.active is None:
            return {}
        return self.entries.get(self.store.active, {})

    def _before_block(self, index: int, block: nn.Module, args: tuple) -> tuple | None:
        table = self._active()
        tuner = table.get(index)
        if tuner is None:
            return None
        x = args[0]
        prefix = self.model.num_prefix_tokens
        tokens = tuner(x.shape[0]).to(x.dtype)
        if index == min(table):
            rest = x[:, prefix:]
        elif self._inserted == tokens.shape[1]:
            rest = x[:, prefix + self._inserted :]
        else:
            raise RuntimeError(
                f"blocks.{index}: expected {tokens.shape[1]} prompt tokens from blocks.{min(table)}, found "
                f"{self._inserted}; run the model from its input (forward or forward_features), not block by block"
            )
        self._inserted = tokens.shape[1]
        return (torch.cat([x[:, :prefix], tokens, rest], dim=1), *args[1:])

    def _after_norm(self, norm: nn.Module, args: tuple, output: torch.Tensor | None) -> torch.Tensor | None:
        inserted, self._inserted = self._inserted, 0
        if output is None or not inserted or not self._active():
            return None
        prefix = self.model.num_prefix_tokens
        return torch.cat([output[:, :prefix], output[:, prefix + inserted :]], dim=1)
