"""The compiled numba rasterizer backend against the pure-PyTorch reference backend: images, alphas,
``info`` and gradients on random scenes, every render mode, several cameras, spherical harmonics and
edge cases (Gaussians behind the camera, off the image, huge, tiny, transparent, none), the brute-force
reference renderer, tile sizes, backend selection, and gsplat's DefaultStrategy on its output.

The first run on a machine compiles the kernels (about half a minute on 2 cores); later runs load
them from numba's on-disk cache.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mono4d.data.errors import ParameterError
from mono4d.models import projection_numba, rasterizer_numba
from mono4d.models.rasterizer import rasterization
from tests.test_rasterizer import HEIGHT, WIDTH, brute_force_render, intrinsics, look_from, random_scene

PARAMETERS = ("means", "quats", "scales", "opacities", "colors")


def two_cameras() -> tuple[torch.Tensor, torch.Tensor]:
    """The identity camera and one turned 12 degrees and shifted, with slightly different intrinsics."""
    w2c = torch.tensor(np.stack([np.eye(4), look_from(12.0, (0.3, -0.1, 0.2))]), dtype=torch.float32)
    return w2c, torch.cat([intrinsics(), intrinsics(cx=11.7, cy=8.2, focal=22.0)])


def render_both(scene: dict[str, torch.Tensor], viewmats: torch.Tensor, Ks: torch.Tensor, seed: int = 0,
                **options) -> dict[str, dict]:
    """Render ``scene`` with the torch and numba backends, back-propagate the same random weighting of
    the colours and alphas, and return per backend its outputs, info and leaf gradients."""
    results = {}
    for backend in ("torch", "numba"):
        leaves = {name: value.clone().requires_grad_(True) for name, value in scene.items()}
        colors, alphas, info = rasterization(**leaves, viewmats=viewmats, Ks=Ks, width=WIDTH, height=HEIGHT,
                                             backend=backend, **options)
        generator = torch.Generator().manual_seed(seed)
        color_weights = torch.rand(colors.shape, generator=generator) - 0.3
        alpha_weights = torch.rand(alphas.shape, generator=generator) - 0.3
        loss = (colors * color_weights).sum() + (alphas * alpha_weights).sum()
        if loss.requires_grad:
            loss.backward()
        results[backend] = {"colors": colors.detach(), "alphas": alphas.detach(), "info": info,
                            "grads": {name: leaf.grad for name, leaf in leaves.items()}}
    return results


def assert_same(results: dict[str, dict]) -> None:
    """Forward within 1e-5, gradients within 1e-4 of their largest magnitude, same info."""
    reference, numba = results["torch"], results["numba"]
    torch.testing.assert_close(numba["colors"], reference["colors"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(numba["alphas"], reference["alphas"], atol=1e-5, rtol=0)
    assert numba["info"]["backend"] == "numba" and reference["info"]["backend"] == "torch"
    assert set(numba["info"]) == set(reference["info"])
    for key, value in reference["info"].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(numba["info"][key].detach(), value.detach(), msg=key)
        elif key != "backend":
            assert numba["info"][key] == value, key
    gradients = [(name, numba["grads"][name], reference["grads"][name]) for name in reference["grads"]]
    if reference["info"]["means2d"].grad is not None:
        gradients.append(("means2d", numba["info"]["means2d"].grad, reference["info"]["means2d"].grad))
    for name, ours, expected in gradients:
        assert (ours is None) == (expected is None), name
        if expected is not None:
            scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-6)
            torch.testing.assert_close(ours, expected, atol=1e-4 * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("render_mode", ["RGB", "D", "ED", "RGB+D", "RGB+ED"])
def test_render_modes_match_the_torch_backend_in_two_cameras(render_mode: str):
    viewmats, Ks = two_cameras()
    results = render_both(random_scene(40, seed=11), viewmats, Ks, render_mode=render_mode,
                          backgrounds=torch.tensor([[0.1, 0.2, 0.3], [0.9, 0.5, 0.0]]))
    assert_same(results)
    channels = {"RGB": 3, "D": 1, "ED": 1, "RGB+D": 4, "RGB+ED": 4}[render_mode]
    assert results["numba"]["colors"].shape == (2, HEIGHT, WIDTH, channels)
    assert results["numba"]["alphas"].max() > 0.9  # the opaque stack is drawn


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_scenes_with_spherical_harmonics_and_antialiasing_match(seed: int):
    scene = random_scene(60, seed=seed)
    scene["colors"] = 0.3 * torch.randn(60, 9, 3, generator=torch.Generator().manual_seed(seed))
    viewmats, Ks = two_cameras()
    assert_same(render_both(scene, viewmats, Ks, seed=seed, sh_degree=2, rasterize_mode="antialiased"))


def test_matches_the_brute_force_reference_renderer():
    scene = random_scene(20, seed=0)
    viewmats, _ = two_cameras()
    K = intrinsics(cx=11.7, cy=8.2).repeat(2, 1, 1)
    backgrounds = torch.tensor([[0.1, 0.2, 0.3], [0.9, 0.5, 0.0]])
    colors, alphas, _ = rasterization(**scene, viewmats=viewmats, Ks=K, width=WIDTH, height=HEIGHT,
                                      backgrounds=backgrounds, render_mode="RGB+ED", backend="numba")
    for camera in range(2):
        reference = brute_force_render(scene, viewmats[camera].double().numpy(), K[camera].numpy(), WIDTH, HEIGHT,
                                       backgrounds[camera].numpy())
        np.testing.assert_allclose(colors[camera, ..., :3].numpy(), reference["color"], atol=1e-5)
        np.testing.assert_allclose(alphas[camera, ..., 0].numpy(), reference["alpha"], atol=1e-5)
        assert reference["stopped"].sum() >= 3  # early termination is exercised


def test_edge_cases_behind_off_image_huge_tiny_and_transparent_match():
    scene = random_scene(12, seed=7)
    scene["means"][4] = torch.tensor([0.0, 0.0, -2.0])  # behind the camera
    scene["means"][5] = torch.tensor([5.0, 0.0, 2.0])  # far off the image to the right
    scene["means"][6] = torch.tensor([-0.7, 0.3, 3.0])  # centre off the image, its footprint reaches in
    scene["scales"][6] = torch.tensor([0.6, 0.5, 0.4])
    scene["scales"][7] = torch.tensor([8.0, 6.0, 5.0])  # huge: covers the whole image
    scene["scales"][8] = torch.tensor([1e-4, 2e-4, 1e-4])  # tiny: below one pixel, blurred by eps2d
    scene["opacities"][9] = 0.5 / 255  # transparent: culled
    scene["means"][10] = torch.tensor([-2.0, 0.3, 2.0])  # outside the clamped field of view, footprint reaches in
    scene["scales"][10] = torch.tensor([1.5, 1.0, 0.5])
    scene["means"][11] = torch.tensor([0.0, 0.0, 0.005])  # in front of the camera but nearer than near_plane
    for rasterize_mode in ("classic", "antialiased"):
        results = render_both(scene, torch.eye(4)[None], intrinsics(), render_mode="RGB+ED",
                              rasterize_mode=rasterize_mode)
        assert_same(results)
        radii = results["numba"]["info"]["radii"][0]
        assert (radii[[4, 5, 9, 11]] == 0).all() and (radii[[6, 7, 10]] > 0).all()
        # The tiny one is drawn, blurred by eps2d, unless antialiasing compensates its opacity below 1/255.
        assert (radii[8] > 0).all() == (rasterize_mode == "classic")
        assert radii[7].min() > WIDTH
        assert (results["numba"]["info"]["depths"][0, [4, 11]] == 0).all()  # culled entries stay zero
        assert (results["numba"]["grads"]["quats"][10] != 0).any()  # the clamped Jacobian passes gradients


def test_far_plane_and_radius_clip_match():
    scene = random_scene(30, seed=4)
    assert_same(render_both(scene, torch.eye(4)[None], intrinsics(), far_plane=3.2, radius_clip=2.5))


@pytest.mark.parametrize("sh_degree", [0, 1, 2, 3])
def test_spherical_harmonics_degrees_in_two_cameras_match(sh_degree: int):
    """Shared coefficients [N, K, 3] (one Gaussian seen by both cameras) and per-camera ones
    [C, N, K, 3], with more coefficients than the degree uses; colours clamp at 0 for some."""
    viewmats, Ks = two_cameras()
    generator = torch.Generator().manual_seed(sh_degree)
    scene = random_scene(30, seed=sh_degree)
    for shape in ((30, 16, 3), (2, 30, 16, 3)):
        scene["colors"] = 0.6 * torch.randn(shape, generator=generator)
        results = render_both(scene, viewmats, Ks, seed=sh_degree, sh_degree=sh_degree, render_mode="RGB+D")
        assert_same(results)
        used = (sh_degree + 1) ** 2
        assert (results["numba"]["grads"]["colors"][..., used:, :] == 0).all()
        assert (results["numba"]["grads"]["colors"][..., :used, :] != 0).any()


def test_compiled_stages_apply_only_where_they_are_exact():
    viewmats, Ks = two_cameras()
    chosen = rasterizer_numba.kernels(viewmats, Ks, "pinhole", None, 3)
    assert chosen["projector"] is projection_numba.project and chosen["shader"] is projection_numba.shade
    assert set(rasterizer_numba.kernels(viewmats, Ks, "ortho", None, 4)) == {"compositor"}
    assert "projector" not in rasterizer_numba.kernels(viewmats, Ks, "pinhole", torch.eye(3)[None], None)
    assert "projector" not in rasterizer_numba.kernels(viewmats, Ks.requires_grad_(True), "pinhole", None, 1)
    assert set(rasterizer_numba.kernels(viewmats.requires_grad_(True), Ks, "pinhole", None, 1)) == {"compositor"}


@pytest.mark.parametrize("case", ["optimised cameras", "covars", "ortho", "fisheye", "sh degree 4"])
def test_fallback_to_the_torch_stages_matches(case: str):
    viewmats, Ks = two_cameras()
    scene, options = random_scene(30, seed=6), {}
    if case == "covars":
        from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci

        options["covars"] = _quat_scale_to_covar_preci(scene["quats"], scene["scales"], compute_preci=False)[0]
    elif case in ("ortho", "fisheye"):
        options["camera_model"] = case
        if case == "ortho":
            Ks = Ks.clone()
            Ks[:, 0, 0] = Ks[:, 1, 1] = 6.0
    elif case == "sh degree 4":
        scene["colors"] = 0.3 * torch.randn(30, 25, 3, generator=torch.Generator().manual_seed(0))
        options["sh_degree"] = 4
    results = {}
    for backend in ("torch", "numba"):
        cameras = viewmats.clone().requires_grad_(case == "optimised cameras")
        leaves = {name: value.clone().requires_grad_(True) for name, value in scene.items()}
        colors, alphas, _ = rasterization(**leaves, viewmats=cameras, Ks=Ks, width=WIDTH, height=HEIGHT,
                                          backend=backend, **options)
        (colors.square().sum() + alphas.sum()).backward()
        results[backend] = (colors.detach(), {name: leaf.grad for name, leaf in leaves.items()}, cameras.grad)
    torch.testing.assert_close(results["numba"][0], results["torch"][0], atol=1e-5, rtol=1e-5)
    assert results["numba"][0].abs().sum() > 0
    for name, expected in results["torch"][1].items():
        if expected is None:  # quats and scales, replaced by covars
            assert results["numba"][1][name] is None, name
            continue
        scale = max(float(expected.abs().max()), 1e-6)
        torch.testing.assert_close(results["numba"][1][name], expected, atol=1e-4 * scale, rtol=1e-4, msg=name)
    if case == "optimised cameras":
        assert results["numba"][2] is not None and results["numba"][2].abs().sum() > 0
        torch.testing.assert_close(results["numba"][2], results["torch"][2], atol=1e-4, rtol=1e-4)


def test_all_transparent_and_empty_scenes_render_the_background_with_zero_gradients():
    background = torch.tensor([[0.25, 0.5, 0.75]])
    transparent = random_scene(8, seed=3)
    transparent["opacities"] = torch.full((8,), 0.5 / 255)
    empty = {name: value[:0] for name, value in random_scene(4, seed=0).items()}
    for scene in (transparent, empty):
        results = render_both(scene, torch.eye(4)[None], intrinsics(), backgrounds=background, render_mode="RGB")
        assert_same(results)
        assert (results["numba"]["alphas"] == 0).all()
        torch.testing.assert_close(results["numba"]["colors"], background[:, None, None, :].expand(1, HEIGHT, WIDTH, 3))
        for name, grad in results["numba"]["grads"].items():
            assert grad is not None and (grad == 0).all(), name


@pytest.mark.parametrize("tile_size", [1, 5, 8, 64])
def test_tile_size_does_not_change_the_result(tile_size: int):
    scene = random_scene(30, seed=9)
    common = dict(viewmats=torch.eye(4)[None], Ks=intrinsics(), width=WIDTH, height=HEIGHT, backend="numba")
    results = []
    for size in (16, tile_size):
        leaves = {name: value.clone().requires_grad_(True) for name, value in scene.items()}
        colors, alphas, info = rasterization(**leaves, tile_size=size, **common)
        (colors.square().sum() + alphas.sum()).backward()
        results.append((colors, alphas, [leaves[name].grad for name in PARAMETERS], info["means2d"].grad))
    (colors_a, alphas_a, grads_a, means2d_a), (colors_b, alphas_b, grads_b, means2d_b) = results
    torch.testing.assert_close(colors_b, colors_a, atol=1e-6, rtol=0)
    torch.testing.assert_close(alphas_b, alphas_a, atol=1e-6, rtol=0)
    torch.testing.assert_close(means2d_b, means2d_a, atol=1e-6, rtol=1e-6)
    for name, grad_a, grad_b in zip(PARAMETERS, grads_a, grads_b):
        torch.testing.assert_close(grad_b, grad_a, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("options", [{}, {"rasterize_mode": "antialiased", "sh_degree": 3}])
def test_gradcheck_float64(options: dict):
    scene = {name: value.double() for name, value in random_scene(6, seed=5).items()}
    scene["opacities"] = scene["opacities"].clamp(max=0.9)  # no clamped alphas (kinks) at any pixel
    if "sh_degree" in options:  # small coefficients: no colour clamped at 0 (a kink)
        scene["colors"] = 0.15 * torch.randn(6, 16, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    viewmats, K = torch.eye(4, dtype=torch.float64)[None], intrinsics().double()
    weights = torch.rand(1, HEIGHT, WIDTH, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def render(*values):
        colors, alphas, _ = rasterization(**dict(zip(PARAMETERS, values)), viewmats=viewmats, Ks=K, width=WIDTH,
                                          height=HEIGHT, render_mode="RGB+D", backend="numba", **options)
        return (colors * weights).sum() + alphas.square().sum()

    inputs = tuple(scene[name].clone().requires_grad_(True) for name in PARAMETERS)
    assert torch.autograd.gradcheck(render, inputs, eps=1e-7, atol=1e-5, rtol=1e-3)


def test_backend_selection_and_options():
    scene = random_scene(4, seed=0)
    common = dict(viewmats=torch.eye(4)[None], Ks=intrinsics(), width=WIDTH, height=HEIGHT)
    assert rasterization(**scene, **common)[2]["backend"] == "numba"
    assert rasterization(**scene, backend="torch", **common)[2]["backend"] == "torch"
    with pytest.raises(ParameterError, match="tile_size"):
        rasterization(**scene, backend="numba", tile_size=0, **common)
    with pytest.raises(ParameterError, match="numba rasterizer does not support packed"):
        rasterization(**scene, backend="numba", packed=True, **common)
    with pytest.raises(ParameterError, match="CPU tensors"):
        rasterization(**{name: value.to("meta") for name, value in scene.items()}, backend="numba",
                      viewmats=torch.eye(4, device="meta")[None], Ks=intrinsics().to("meta"), width=WIDTH,
                      height=HEIGHT)
    # The torch backend's memory bound is accepted and changes nothing.
    plain = rasterization(**scene, backend="numba", **common)[0]
    torch.testing.assert_close(rasterization(**scene, backend="numba", max_pairs=10, **common)[0], plain)


def test_depth_sort_is_numpys_stable_argsort():
    """The radix sort of the visible list: ties keep camera-major order, -0 equals +0, negative and
    infinite keys and subnormals sort as numpy does."""
    generator = np.random.default_rng(0)
    cases = [generator.standard_normal(1000), np.round(generator.standard_normal(5000), 1),
             generator.random(20000).astype(np.float32).astype(np.float64), np.full(7, 2.5), np.zeros(0),
             np.array([0.0, -0.0, 1.0, -1.0, 0.0, np.inf, -np.inf, 1e-320, -1e-320, 3.0, -0.0])]
    for keys in cases:
        np.testing.assert_array_equal(projection_numba._stable_order(keys), np.argsort(keys, kind="stable"))
