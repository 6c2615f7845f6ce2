"""ODE samplers against the exact velocity field of Gaussian data.

For data x0 ~ N(mu, s^2) (per dimension) and noise eps ~ N(0, 1) on the path
x_t = (1-t) x0 + t eps, x_t is Gaussian with var_t = (1-t)^2 s^2 + t^2 and
    E[x0 | x_t]  = mu + (1-t) s^2 / var_t * (x_t - (1-t) mu)
    E[eps | x_t] =          t / var_t * (x_t - (1-t) mu)
The exact ODE maps noise x1 to mu + s * x1 (an increasing affine map between Gaussians),
so every sampled point has a known answer.
"""

import pytest
import torch

from megafusion.diffusion.flow import make_target
from megafusion.diffusion.sampling import guided_velocity, sample_ode, time_grid

MU = torch.tensor([1.5, -2.0, 0.0, 0.5], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 1.0, 1.5, 0.3], dtype=torch.float64)


def exact_denoiser(prediction, mu=MU, sigma=SIGMA):
    def model(x, t):
        t = t.view(-1, 1)
        var = (1 - t) ** 2 * sigma**2 + t**2
        centred = x - (1 - t) * mu
        x0 = mu + (1 - t) * sigma**2 / var * centred
        eps = t / var * centred
        return make_target(x0, eps, prediction)

    return model


def _noise(n=20000):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _error(method, prediction, steps, shift=1.0):
    x1 = _noise(2000)
    x0 = sample_ode(exact_denoiser(prediction), x1, steps, method=method, prediction=prediction, shift=shift)
    return ((x0 - (MU + SIGMA * x1)).abs() / SIGMA).max().item()


@pytest.mark.parametrize("prediction", ["x", "v", "eps"])
@pytest.mark.parametrize("method,steps,tol", [("euler", 100, 0.04), ("heun", 50, 0.01)])
def test_sampler_recovers_gaussian(method, steps, tol, prediction):
    x1 = _noise()
    x0 = sample_ode(exact_denoiser(prediction), x1, steps, method=method, prediction=prediction, shift=1.5)
    # population statistics (20000 draws: standard error of the mean 0.007 sigma)
    torch.testing.assert_close(x0.mean(0), MU, atol=0.03, rtol=0)
    torch.testing.assert_close(x0.std(0), SIGMA, atol=0, rtol=tol + 0.02)
    # and against the noise actually drawn (Euler shrinks the spread by O(1/steps))
    torch.testing.assert_close(x0.std(0) / x1.std(0), SIGMA, atol=0, rtol=tol)
    torch.testing.assert_close(x0.mean(0), MU + SIGMA * x1.mean(0), atol=0.01, rtol=0)


@pytest.mark.parametrize("prediction", ["x", "v"])
def test_heun_beats_euler_and_both_converge(prediction):
    for shift in (1.0, 2.0):
        e16, h16 = _error("euler", prediction, 16, shift), _error("heun", prediction, 16, shift)
        assert h16 < 0.5 * e16, (shift, h16, e16)
    # first order vs second order: doubling the steps halves / quarters the error
    e16, e32 = _error("euler", prediction, 16), _error("euler", prediction, 32)
    h16, h32 = _error("heun", prediction, 16), _error("heun", prediction, 32)
    assert 1.6 < e16 / e32 < 2.4
    assert h16 / h32 > 3.0


def test_parameterisations_give_the_same_trajectory():
    x1 = _noise(500)
    runs = {p: sample_ode(exact_denoiser(p), x1, 10, method="heun", prediction=p, t_start=0.999)
            for p in ("x", "v", "eps")}
    torch.testing.assert_close(runs["x"], runs["v"])
    torch.testing.assert_close(runs["eps"], runs["v"])


def test_classifier_free_guidance_combines_velocities():
    cond_mu, uncond_mu = MU, torch.zeros(4, dtype=torch.float64)
    x = _noise(100) * 0.7
    for t in (0.9, 0.4):
        vs = {}
        for p in ("x", "v", "eps"):
            vs[p] = guided_velocity(exact_denoiser(p, cond_mu), x, t, p, cfg_scale=4.0,
                                    uncond_model=exact_denoiser(p, uncond_mu))
        v_c = guided_velocity(exact_denoiser("v", cond_mu), x, t, "v")
        v_u = guided_velocity(exact_denoiser("v", uncond_mu), x, t, "v")
        torch.testing.assert_close(vs["v"], v_u + 4.0 * (v_c - v_u))
        torch.testing.assert_close(vs["x"], vs["v"])
        torch.testing.assert_close(vs["eps"], vs["v"])
    # scale 1 is the conditional sampler; guidance pushes the mean past the conditional one
    x1 = _noise(4000)
    plain = sample_ode(exact_denoiser("x", cond_mu), x1, 16, method="heun")
    same = sample_ode(exact_denoiser("x", cond_mu), x1, 16, method="heun", cfg_scale=1.0,
                      uncond_model=exact_denoiser("x", uncond_mu))
    torch.testing.assert_close(plain, same)
    guided = sample_ode(exact_denoiser("x", cond_mu), x1, 16, method="heun", cfg_scale=3.0,
                        uncond_model=exact_denoiser("x", uncond_mu))
    moved = guided.mean(0) - plain.mean(0)
    assert (moved[cond_mu != 0] * cond_mu[cond_mu != 0] > 0).all()
    with pytest.raises(ValueError, match="uncond_model"):
        sample_ode(exact_denoiser("x"), x1, 4, cfg_scale=2.0)


def test_time_grid_is_shifted_and_decreasing():
    g = time_grid(10, shift=3.0, dtype=torch.float64)
    assert g[0] == 1 and g[-1] == 0 and (g[1:] < g[:-1]).all()
    plain = time_grid(10, dtype=torch.float64)
    assert (g[1:-1] > plain[1:-1]).all(), "shift > 1 spends more of the grid near noise"
    assert time_grid(4, t_start=0.5)[0].item() == 0.5
