"""The first steps of a sampling loop as detectors read them: the latents after each step and the
conditional noise prediction of each step, from the loop itself (no extra UNet call).

:class:`LoopReader` reads a running loop: a forward hook on the UNet keeps its calls (the loop's own noise
predictions) and :meth:`LoopReader.on_step`, called from a ``callback_on_step_end``, keeps the latents
after each step. :func:`first_steps` runs a pipeline for its first ``end`` steps under a reader (the loop is
the pipeline's own: any scheduler, guidance on or off, a guarded pipeline's mitigation included); the
guarded pipeline reads its full loop with the same reader. A :class:`LoopDetector` scores a
:class:`Trajectory` (``score_trajectory``), so the registry detector and the guarded pipeline's flag share
one formula.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from diffmem.conditioning import to_epsilon
from diffmem.detectors.base import DETECTORS, Detector
from diffmem.detectors.wen import is_guarded
from diffmem.hooks.noise import UNetCall, in_side_pass, timestep_of, unet_output

__all__ = [
    "LoopDetector",
    "LoopReader",
    "Trajectory",
    "detector_from_record",
    "detector_record",
    "first_steps",
    "loop_detector",
    "loop_detector_names",
]


@dataclass
class Trajectory:
    """``latents[k]``: the sampler's latent before step ``k`` (``latents[0]`` is the scaled starting noise,
    ``latents[end]`` the latent after the last step read), float32 ``[batch, ...]``; ``cond_eps[k]``: the
    conditional noise prediction at step ``k`` (``k < end``)."""

    latents: list[torch.Tensor]
    cond_eps: list[torch.Tensor]


class LoopReader:
    """Reads the first ``end`` steps of a running sampling loop into a :class:`Trajectory`.

    Open :meth:`reading` on the UNet around the loop and call :meth:`on_step` from its
    ``callback_on_step_end`` with the latents the loop goes on from. The starting latent is the first
    UNet call's input with the scheduler's input scaling undone (the loop's own ``x_T``); the extra pass of
    a hook (:func:`diffmem.hooks.noise.side_pass`) is no loop call.
    """

    def __init__(self, scheduler, end: int):
        self.scheduler, self.end = scheduler, end
        self.calls: list[UNetCall] = []
        self.after: list[torch.Tensor] = []  # the latent after step k
        self.calls_at_step: list[int] = []  # UNet calls seen when step k ended
        self.n_calls = 0
        self.start_scale: torch.Tensor | None = None

    def _hook(self, module, args, kwargs, output):
        if in_side_pass(module):
            return None
        self.n_calls += 1
        if self.n_calls > self.end:
            return None
        sample = args[0] if args else kwargs["sample"]
        t = torch.as_tensor(timestep_of(args, kwargs)).detach()
        if self.n_calls == 1:  # the factor scale_model_input applied to x_T at this step (1 for DDIM)
            one = torch.ones((), dtype=torch.float32, device=sample.device)
            self.start_scale = torch.as_tensor(self.scheduler.scale_model_input(one, t)).float()
        self.calls.append(UNetCall(sample.detach().float(), t, unet_output(output).detach().float()))
        return None

    @contextlib.contextmanager
    def reading(self, unet: torch.nn.Module) -> Iterator[LoopReader]:
        """The UNet hook, removed when the block ends (also on an exception)."""
        handle = unet.register_forward_hook(self._hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def on_step(self, i: int, latents: torch.Tensor) -> None:
        """Step ``i`` has ended with ``latents`` (what the loop goes on from)."""
        if len(self.after) < self.end:
            self.after.append(latents.detach().float())
            self.calls_at_step.append(self.n_calls)

    def trajectory(self, batch: int) -> Trajectory | None:
        """The first ``end`` steps of ``batch`` images, or ``None`` when the loop stopped before them; a
        scheduler that calls the UNet more than once per step raises ``RuntimeError``."""
        if self.calls_at_step != list(range(1, len(self.calls_at_step) + 1)):
            raise RuntimeError(
                f"expected one UNet call per sampling step, saw {self.calls_at_step[-1]} calls in "
                f"{len(self.calls_at_step)} steps (a multi-evaluation scheduler is not supported)"
            )
        if len(self.after) < self.end:
            return None
        start = self.calls[0].sample[-batch:] / self.start_scale.to(self.calls[0].sample.device)
        cond = []
        for c in self.calls:
            out = c.output[-batch:] if c.output.shape[0] == 2 * batch else c.output
            cond.append(to_epsilon(self.scheduler, out, c.sample[-batch:], c.timestep))
        return Trajectory(latents=[start, *self.after], cond_eps=cond)


def first_steps(pipe, prompts: list[str], latents: torch.Tensor, settings: dict, end: int) -> Trajectory:
    """Run ``pipe`` on ``prompts`` from ``latents`` (before ``init_noise_sigma``) for its first ``end`` steps."""
    if end > settings["num_inference_steps"]:
        raise ValueError(
            f"the detector needs {end} sampling steps; num_inference_steps={settings['num_inference_steps']}"
        )
    reader = LoopReader(pipe.scheduler, end)

    def keep(p, i, t, callback_kwargs):
        reader.on_step(i, callback_kwargs["latents"])
        if i + 1 >= end:
            p._interrupt = True
        return {}

    call = dict(
        prompt=list(prompts),
        num_images_per_prompt=settings["num_gens"],
        num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
        latents=latents,
        height=settings.get("height"),
        width=settings.get("width"),
        output_type="latent",
        callback_on_step_end=keep,
        callback_on_step_end_tensor_inputs=["latents"],
        **settings.get("pipeline_kwargs", {}),
    )
    if is_guarded(pipe) and "mitigation" not in call and "memorization_threshold" not in call:
        call["memorization_threshold"] = 0.0  # no flag is used: keep the model's calibration out of the call
    if is_guarded(
        pipe
    ):  # its own score is not used: Wen's, free under guidance, whatever the folder's default
        call.setdefault("memorization_detector", "wen")
    with torch.no_grad(), reader.reading(pipe.unet):
        pipe(**call)
    path = reader.trajectory(latents.shape[0])
    if path is None:
        raise RuntimeError(f"the sampling loop stopped after {len(reader.after)} of {end} steps")
    return path


class LoopDetector(Detector):
    """A detector that reads only what the sampling loop computes anyway (the latents after each step and
    the conditional noise predictions): its score is :meth:`score_trajectory` of the first
    :meth:`loop_steps` steps, which the guarded pipeline can also read from its own loop
    (``memorization_detector=``) at no extra UNet call."""

    @abstractmethod
    def loop_steps(self) -> int:
        """How many sampling steps the score reads (the first ones)."""

    @abstractmethod
    def score_trajectory(self, path: Trajectory) -> torch.Tensor:
        """The score ``[batch]`` of the loop's first :meth:`loop_steps` steps (``path`` may hold more)."""

    def score_latents(self, pipe, prompts, latents, settings) -> torch.Tensor:
        return self.score_trajectory(first_steps(pipe, prompts, latents, settings, self.loop_steps()))


def loop_detector_names() -> list[str]:
    """Registered detectors that read only the sampling loop (:class:`LoopDetector`), sorted."""
    return [n for n in DETECTORS.names() if issubclass(DETECTORS.get_class(n), LoopDetector)]


def loop_detector(spec, argument: str = "memorization_detector") -> LoopDetector | None:
    """The detector a guarded loop can read for ``spec``: ``None`` for ``"wen"`` (the noise gap, read by its
    own hook), the :class:`LoopDetector` for a loop-reading name or object; anything else raises a
    ``ValueError`` naming ``argument`` and the allowed values."""
    if spec == "wen":
        return None
    if isinstance(spec, LoopDetector):
        return spec
    allowed = ["wen", *loop_detector_names()]
    if isinstance(spec, str) and spec in allowed:
        return DETECTORS.create(spec)
    what = spec if isinstance(spec, str) else type(spec).__name__
    raise ValueError(
        f"{argument}={what!r}: expected one of {', '.join(map(repr, allowed))} (the detectors that read only what "
        "the sampling loop computes) or a LoopDetector object"
    )


def detector_record(detector: LoopDetector | None) -> dict:
    """What a calibration records of the detector its threshold is for (``{"name": "wen"}`` for ``None``)."""
    return {"name": "wen"} if detector is None else detector.config()


def detector_from_record(record: dict, argument: str) -> LoopDetector | None:
    """The detector of a :func:`detector_record` (``None`` for Wen's noise gap)."""
    options = {k: v for k, v in record.items() if k != "name"}
    if record.get("name") == "wen":
        return None
    return loop_detector(DETECTORS.create(record.get("name"), options), argument)
