"""ODE samplers for the flow-matching path of ``megafusion.diffusion.flow``.

Time runs from noise (t = 1) to data (t = 0) on a shifted grid; each step moves ``x`` by
``(t_next - t) * v(x, t)`` where the velocity ``v`` is read from the model's prediction in
its configured parameterisation (``flow.to_velocity``). Classifier-free guidance combines
the conditional and unconditional predictions as ``u + scale * (c - u)``; for fixed
``(x_t, t)`` every parameterisation is an affine function of the others, so combining
velocities (done here) equals combining x-, v- or eps-predictions.

Model evaluations per sample: Euler ``steps``, Heun ``2 * steps - 1`` (the last step ends
at t = 0, where x-prediction defines no velocity, so it is an Euler step - as in EDM),
each doubled when guidance is on.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from megafusion.diffusion.flow import PREDICTIONS, Prediction, time_shift, to_velocity

#: model(x_t [B, ...], t [B]) -> prediction [B, ...] in the configured parameterisation.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("euler", "heun")


def time_grid(steps: int, shift: float = 1.0, t_start: float = 1.0, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[steps + 1] decreasing timesteps from ``t_start`` to 0: a uniform grid in [1, 0]
    passed through ``time_shift(., shift)`` (shift > 1 spends more steps near noise),
    then scaled by ``t_start``."""
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least one sampling step")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start={t_start}: must lie in (0, 1]")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (time_shift(u, shift) * t_start).to(device=device, dtype=dtype)


def guided_velocity(model: Denoiser, x: torch.Tensor, t: float | torch.Tensor, prediction: Prediction,
                    cfg_scale: float = 1.0, uncond_model: Denoiser | None = None,
                    min_denominator: float = 1e-5) -> torch.Tensor:
    """The (guided) velocity at ``x`` [B, ...] and scalar time ``t``."""
    t_batch = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
    t_b = t_batch.view(-1, *([1] * (x.dim() - 1)))
    v = to_velocity(model(x, t_batch), x, t_b, prediction, min_denominator)
    if cfg_scale != 1.0:
        v_uncond = to_velocity(uncond_model(x, t_batch), x, t_b, prediction, min_denominator)
        v = v_uncond + cfg_scale * (v - v_uncond)
    return v


@torch.no_grad()
def sample_ode(
    model: Denoiser,
    noise: torch.Tensor,
    steps: int = 25,
    *,
    method: Literal["euler", "heun"] = "euler",
    prediction: Prediction = "x",
    shift: float = 1.0,
    cfg_scale: float = 1.0,
    uncond_model: Denoiser | None = None,
    t_start: float | None = None,
    min_denominator: float = 1e-5,
) -> torch.Tensor:
    """Integrates the flow ODE from ``noise`` [B, ...] at t = ``t_start`` to t = 0.

    Args:
        model: conditional denoiser ``model(x_t, t) -> prediction`` (t is [B]).
        steps: number of intervals of the time grid.
        method: ``"euler"`` (first order) or ``"heun"`` (second order).
        prediction: the parameterisation ``model`` returns (``"x"``, ``"v"``, ``"eps"``).
        shift: time shift of the grid (use ``flow.resolve_shift`` for training's rule).
        cfg_scale: guidance scale; 1 = no guidance (``uncond_model`` then unused).
        uncond_model: the denoiser with the condition dropped; required if ``cfg_scale != 1``.
        t_start: first timestep. Default 1, except 0.999 for ``"eps"``: at t = 1 an
            eps-prediction says nothing about the data, so the velocity is undefined there.
    Returns the sample at t = 0, same shape and dtype as ``noise``.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {METHODS}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r}: choose one of {PREDICTIONS}")
    if cfg_scale != 1.0 and uncond_model is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs uncond_model (the denoiser without the condition)")
    if t_start is None:
        t_start = 0.999 if prediction == "eps" else 1.0
    grid = time_grid(steps, shift, t_start).tolist()

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        return guided_velocity(model, x, t, prediction, cfg_scale, uncond_model, min_denominator)

    x = noise
    for t, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t
        v = velocity(x, t)
        x_euler = x + dt * v
        if method == "heun" and t_next > 0:
            x = x + dt * 0.5 * (v + velocity(x_euler, t_next))
        else:
            x = x_euler
    return x
