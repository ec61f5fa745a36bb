"""A model's configuration on this agent: the options the agent itself applies, read from the
configuration the control plane merged, validated and signed into the desired state.

Applying a configuration never restarts anything: the version already serving is wrapped again
(``configure``) and swapped in through the serving table like a new version, so it goes
through the same health window, and a configuration that makes requests fail is rolled back
to the previous one like a failing version. A version with a configuration is identified by
``serving_key`` (manifest digest + configuration digest), which the plan and the failed
records use.

Options the agent applies (any other key belongs to the bundle and is carried, not used):

- ``maxBatch`` (integer >= 1): the most rows (first dimension of each input) one request may
  carry; a request with more fails.
- ``outputs`` (list of output names): the outputs answered, in the model's order; a name the
  model does not have refuses the configuration.
- ``batching`` (``{"maxBatchSize": int >= 1, "maxQueueDelayMs": number >= 0}``): dynamic
  batching of the model's requests (agent/serving/batching.py), over what the version had.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.exceptions import InferenceInputError, UpdateError
from agent.serving.batching import BatchPolicy
from agent.serving.runtime import LoadedModel, Runtime
from protocol.desired import config_digest
from protocol.manifest import TensorSpec


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """The options of one model's configuration that this agent applies itself."""

    max_batch: int | None = None
    outputs: tuple[str, ...] | None = None
    batching: BatchPolicy | None = None


def _batching(doc: object) -> BatchPolicy | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise UpdateError("configuration batching must be an object")
    size = doc.get("maxBatchSize")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UpdateError("configuration batching.maxBatchSize must be an integer >= 1")
    delay = doc.get("maxQueueDelayMs", 0)
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= 10_000:
        raise UpdateError("configuration batching.maxQueueDelayMs must be within 0 to 10000")
    return BatchPolicy(max_batch_size=size, max_queue_delay_s=delay / 1000)


def model_options(config: Mapping[str, Any] | None) -> ModelOptions:
    """Read the agent's options from a configuration; raises UpdateError naming a bad one.

    The control plane validated the configuration against the bundle's schema; this checks
    only what the agent relies on, so a bundle whose schema allows more still cannot make the
    agent do something it does not understand.
    """
    if not config:
        return ModelOptions()
    max_batch = config.get("maxBatch")
    if max_batch is not None and (
        isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1
    ):
        raise UpdateError(f"configuration maxBatch must be an integer >= 1, not {max_batch!r}")
    outputs = config.get("outputs")
    if outputs is not None and (
        not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs)
    ):
        raise UpdateError("configuration outputs must be a non-empty list of output names")
    return ModelOptions(
        max_batch=max_batch,
        outputs=tuple(outputs) if outputs is not None else None,
        batching=_batching(config.get("batching")),
    )


class ConfiguredRuntime:
    """A loaded runtime seen through a model's options; the runtime itself is shared."""

    def __init__(
        self, inner: Runtime, options: ModelOptions, loaded_batching: BatchPolicy | None
    ) -> None:
        self.inner = inner
        self.options = options
        self.loaded_batching = loaded_batching  # the version's own, before any configuration
        self.config: Mapping[str, Any] = {}  # the whole configuration, set by configure
        self.inputs: tuple[TensorSpec, ...] = inner.inputs
        outputs = inner.outputs
        if options.outputs is not None:
            have = {o.name for o in outputs}
            unknown = [o for o in options.outputs if o not in have]
            if unknown:
                raise UpdateError(
                    f"configuration outputs names {unknown[0]!r}; the model has "
                    f"{', '.join(sorted(have))}"
                )
            outputs = tuple(o for o in outputs if o.name in options.outputs)
        self.outputs: tuple[TensorSpec, ...] = outputs
        self._names = [o.name for o in outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference within the options."""
        limit = self.options.max_batch
        if limit is not None:
            for name, arr in feeds.items():
                if arr.ndim and arr.shape[0] > limit:
                    raise InferenceInputError(
                        f"input {name!r} has {arr.shape[0]} rows; this model's configuration "
                        f"allows {limit} (maxBatch)"
                    )
        out = self.inner.run(feeds)
        if self.options.outputs is None:
            return out
        return {n: out[n] for n in self._names}


def as_loaded(lm: LoadedModel) -> tuple[Runtime, BatchPolicy | None]:
    """The runtime and batching the loader made, under any configuration."""
    rt = lm.runtime
    if isinstance(rt, ConfiguredRuntime):
        return rt.inner, rt.loaded_batching
    return rt, lm.batching


def configure(lm: LoadedModel, config: Mapping[str, Any] | None) -> LoadedModel:
    """``lm`` (as loaded, or already configured) under ``config`` (None: as loaded); the
    runtime is shared, never loaded again. Raises UpdateError for options the agent cannot
    apply."""
    inner, batching = as_loaded(lm)
    if config is None:
        plan = dataclasses.replace(lm.plan, batching=batching)
        return dataclasses.replace(lm, runtime=inner, config_digest=None, plan=plan)
    options = model_options(config)
    runtime = ConfiguredRuntime(inner, options, batching)
    runtime.config = dict(config)
    return dataclasses.replace(
        lm,
        runtime=runtime,
        config_digest=config_digest(config),
        plan=dataclasses.replace(lm.plan, batching=options.batching or batching),
    )


def config_of(lm: LoadedModel) -> dict[str, Any] | None:
    """The configuration ``lm`` serves under, None without one."""
    rt = lm.runtime
    return dict(rt.config) if isinstance(rt, ConfiguredRuntime) else None


def serving_key(lm: LoadedModel) -> str:
    """What identifies a loaded version with its configuration; DesiredModel.serving_key's
    counterpart."""
    d = lm.config_digest
    return lm.manifest_digest if d is None else f"{lm.manifest_digest}+{d}"
