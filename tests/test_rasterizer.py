"""The pure-PyTorch Gaussian rasterizer against an independent brute-force renderer, known answers,
gradients (float64 gradcheck), render modes, spherical harmonics, backend selection, and gsplat's
DefaultStrategy running unchanged on its output."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mono4d.data.errors import ModelUnavailableError, ParameterError
from mono4d.models.rasterizer import rasterization

WIDTH, HEIGHT = 24, 16
FOCAL = 20.0


def intrinsics(cx: float = WIDTH / 2, cy: float = HEIGHT / 2, focal: float = FOCAL) -> torch.Tensor:
    """[1, 3, 3] pixel intrinsics."""
    return torch.tensor([[[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]]])


def look_from(yaw_degrees: float, position: tuple[float, float, float]) -> np.ndarray:
    """4x4 world-to-camera of a camera at ``position`` turned by ``yaw`` about the y axis."""
    angle = math.radians(yaw_degrees)
    rotation_c2w = np.array([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]])
    w2c = np.eye(4)
    w2c[:3, :3] = rotation_c2w.T
    w2c[:3, 3] = -rotation_c2w.T @ np.asarray(position)
    return w2c


def random_scene(n: int, seed: int) -> dict[str, torch.Tensor]:
    """N Gaussians in front of the identity camera at depth 2.5..4, inside its field of view; the first
    four are a stack of broad, nearly opaque ones (so some pixels stop early at transmittance 1e-4)."""
    generator = torch.Generator().manual_seed(seed)
    depth = 2.5 + 1.5 * torch.rand(n, generator=generator)
    x = (torch.rand(n, generator=generator) - 0.5) * 1.1 * depth * (WIDTH / 2) / FOCAL
    y = (torch.rand(n, generator=generator) - 0.5) * 1.1 * depth * (HEIGHT / 2) / FOCAL
    means = torch.stack([x, y, depth], -1)
    opacities = 0.1 + 0.85 * torch.rand(n, generator=generator)
    scales = 0.04 + 0.2 * torch.rand(n, 3, generator=generator)
    means[:4] = torch.tensor([[0.1, 0.05, 2.6], [0.12, 0.0, 2.9], [0.08, 0.07, 3.2], [0.1, 0.03, 3.4]])
    opacities[:4] = torch.tensor([0.9995, 0.998, 0.9995, 0.999])
    scales[:4] = torch.tensor([0.5, 0.35, 0.2])
    return {"means": means, "quats": torch.randn(n, 4, generator=generator), "scales": scales,
            "opacities": opacities, "colors": torch.rand(n, 3, generator=generator)}


def quat_to_rotation(q: np.ndarray) -> np.ndarray:
    """Rotation matrix of a wxyz quaternion (normalised here)."""
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def brute_force_render(scene: dict[str, torch.Tensor], w2c: np.ndarray, K: np.ndarray, width: int, height: int,
                       background: np.ndarray, near: float = 0.01) -> dict[str, np.ndarray]:
    """Reference renderer in float64: every Gaussian at every pixel, front to back by camera depth,
    with EWA projection (+0.3 px^2 blur), alpha = min(0.999, o exp(-d^T S^-1 d / 2)), alphas below
    1/255 skipped and a pixel finished before transmittance would reach 1e-4.
    Returns "color" (H, W, 3) over ``background``, "alpha" (H, W), "depth" (H, W) expected depth and
    "stopped" (H, W) bool, the pixels finished early."""
    means, quats, scales, opacities, colors = (scene[k].detach().double().numpy() for k in
                                               ("means", "quats", "scales", "opacities", "colors"))
    rotation, translation = w2c[:3, :3], w2c[:3, 3]
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    xs, ys = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    transmittance = np.ones((height, width))
    finished = np.zeros((height, width), dtype=bool)
    color = np.zeros((height, width, 3))
    depth_sum = np.zeros((height, width))
    camera_points = means @ rotation.T + translation
    for g in np.argsort(camera_points[:, 2], kind="stable"):
        x, y, z = camera_points[g]
        if z <= near:
            continue
        world_rotation = quat_to_rotation(quats[g])
        covariance = rotation @ world_rotation @ np.diag(scales[g] ** 2) @ world_rotation.T @ rotation.T
        jacobian = np.array([[fx / z, 0, -fx * x / z**2], [0, fy / z, -fy * y / z**2]])
        covariance2d = jacobian @ covariance @ jacobian.T + 0.3 * np.eye(2)
        conic = np.linalg.inv(covariance2d)
        dx, dy = xs - (fx * x / z + cx), ys - (fy * y / z + cy)
        power = 0.5 * (conic[0, 0] * dx * dx + 2 * conic[0, 1] * dx * dy + conic[1, 1] * dy * dy)
        alpha = np.minimum(0.999, opacities[g] * np.exp(-power))
        used = ~finished & (alpha >= 1 / 255)
        next_transmittance = transmittance * (1 - alpha)
        stop = used & (next_transmittance <= 1e-4)
        finished |= stop
        used &= ~stop
        weight = np.where(used, alpha * transmittance, 0.0)
        color += weight[..., None] * colors[g]
        depth_sum += weight * z
        transmittance = np.where(used, next_transmittance, transmittance)
    alpha_image = 1 - transmittance
    color += transmittance[..., None] * background
    return {"color": color, "alpha": alpha_image, "depth": depth_sum / np.maximum(alpha_image, 1e-10),
            "stopped": finished}


def test_matches_brute_force_reference_in_two_cameras():
    scene = random_scene(20, seed=0)
    w2c = np.stack([np.eye(4), look_from(12.0, (0.3, -0.1, 0.2))])
    K = intrinsics(cx=11.7, cy=8.2).repeat(2, 1, 1)
    backgrounds = torch.tensor([[0.1, 0.2, 0.3], [0.9, 0.5, 0.0]])
    colors, alphas, info = rasterization(**scene, viewmats=torch.tensor(w2c, dtype=torch.float32), Ks=K,
                                         width=WIDTH, height=HEIGHT, backgrounds=backgrounds,
                                         render_mode="RGB+ED", backend="torch")
    assert colors.shape == (2, HEIGHT, WIDTH, 4) and alphas.shape == (2, HEIGHT, WIDTH, 1)
    for camera in range(2):
        reference = brute_force_render(scene, w2c[camera], K[camera].numpy(), WIDTH, HEIGHT,
                                       backgrounds[camera].numpy())
        np.testing.assert_allclose(colors[camera, ..., :3].numpy(), reference["color"], atol=1e-5)
        np.testing.assert_allclose(alphas[camera, ..., 0].numpy(), reference["alpha"], atol=1e-5)
        covered = reference["alpha"] > 0.05
        np.testing.assert_allclose(colors[camera, ..., 3].numpy()[covered], reference["depth"][covered], rtol=1e-5)
        assert reference["stopped"].sum() >= 3  # the opaque stack finishes pixels early
    assert info["radii"].shape == (2, 20, 2) and info["radii"].dtype == torch.int32
    assert info["means2d"].shape == (2, 20, 2) and info["depths"].shape == (2, 20)
    assert (info["radii"] > 0).all()
    assert info["gaussian_ids"] is None and info["n_cameras"] == 2
    assert info["width"] == WIDTH and info["height"] == HEIGHT


def single_gaussian(z: float = 2.0, opacity: float = 0.7, color=(0.2, 0.6, 0.9)) -> dict[str, torch.Tensor]:
    """One round Gaussian on the optical axis at depth ``z``."""
    return {"means": torch.tensor([[0.0, 0.0, z]]), "quats": torch.tensor([[1.0, 0.0, 0.0, 0.0]]),
            "scales": torch.full((1, 3), 0.1), "opacities": torch.tensor([opacity]),
            "colors": torch.tensor([color])}


def test_single_gaussian_renders_its_colour_and_opacity_at_its_centre():
    # cx = 12.5, cy = 8.5: the projected mean is the centre of pixel (12, 8).
    K = intrinsics(cx=12.5, cy=8.5)
    background = torch.tensor([[0.5, 0.0, 1.0]])
    colors, alphas, info = rasterization(**single_gaussian(), viewmats=torch.eye(4)[None], Ks=K, width=WIDTH,
                                         height=HEIGHT, backgrounds=background, backend="torch")
    centre = colors[0, 8, 12]
    expected = 0.7 * torch.tensor([0.2, 0.6, 0.9]) + 0.3 * background[0]
    torch.testing.assert_close(alphas[0, 8, 12, 0], torch.tensor(0.7), atol=1e-6, rtol=0)
    torch.testing.assert_close(centre[:3], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(centre[3], torch.tensor(2.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(info["means2d"][0, 0], torch.tensor([12.5, 8.5]))
    # Symmetric falloff around the centre, and the background where the Gaussian does not reach.
    torch.testing.assert_close(alphas[0, 8, 11], alphas[0, 8, 13])
    assert alphas[0, 8, 13, 0] < 0.7
    torch.testing.assert_close(colors[0, 0, 0, :3], background[0])
    assert alphas[0, 0, 0, 0] == 0


def test_gaussian_behind_the_camera_is_culled_and_gradients_stay_finite():
    scene = single_gaussian(z=-2.0)
    for value in scene.values():
        value.requires_grad_(True)
    background = torch.tensor([[0.25, 0.5, 0.75]])
    colors, alphas, info = rasterization(**scene, viewmats=torch.eye(4)[None], Ks=intrinsics(), width=WIDTH,
                                         height=HEIGHT, backgrounds=background, render_mode="RGB", backend="torch")
    assert (info["radii"] == 0).all()
    assert (alphas == 0).all()
    torch.testing.assert_close(colors, background[:, None, None, :].expand(1, HEIGHT, WIDTH, 3))
    colors.sum().backward()
    for name, value in scene.items():
        assert value.grad is not None and torch.isfinite(value.grad).all() and (value.grad == 0).all(), name
    assert (info["means2d"].grad == 0).all()


def test_near_plane_and_transparent_gaussians_are_culled():
    scene = random_scene(6, seed=1)
    scene["means"][3, 2] = 0.005  # in front of the camera but before the near plane
    scene["opacities"][4] = 0.5 / 255  # below the alpha threshold everywhere
    _, _, info = rasterization(**scene, viewmats=torch.eye(4)[None], Ks=intrinsics(), width=WIDTH, height=HEIGHT,
                               backend="torch")
    visible = (info["radii"][0] > 0).all(-1)
    assert visible.tolist() == [True, True, True, False, False, True]


def test_render_modes_share_colours_and_depths():
    scene = random_scene(12, seed=2)
    common = dict(viewmats=torch.eye(4)[None], Ks=intrinsics(), width=WIDTH, height=HEIGHT,
                  backgrounds=torch.tensor([[1.0, 1.0, 1.0]]), backend="torch")
    outputs = {mode: rasterization(**scene, render_mode=mode, **common)[:2] for mode in
               ("RGB", "D", "ED", "RGB+D", "RGB+ED")}
    channels = {mode: out[0].shape[-1] for mode, out in outputs.items()}
    assert channels == {"RGB": 3, "D": 1, "ED": 1, "RGB+D": 4, "RGB+ED": 4}
    rgb, alpha = outputs["RGB"]
    for mode in ("RGB+D", "RGB+ED"):
        torch.testing.assert_close(outputs[mode][0][..., :3], rgb)
    torch.testing.assert_close(outputs["RGB+D"][0][..., 3:], outputs["D"][0])
    torch.testing.assert_close(outputs["RGB+ED"][0][..., 3:], outputs["ED"][0])
    for mode, (_, mode_alpha) in outputs.items():
        torch.testing.assert_close(mode_alpha, alpha, msg=mode)
    # Accumulated depth = expected depth * alpha, and no background in depth channels.
    torch.testing.assert_close(outputs["D"][0], outputs["ED"][0] * alpha, atol=1e-5, rtol=1e-5)
    assert (outputs["D"][0][alpha < 1e-8] == 0).all()
    covered = alpha[..., 0] > 0.5
    expected_depth = outputs["ED"][0][..., 0][covered]
    assert expected_depth.min() >= 2.4 and expected_depth.max() <= 4.1


def test_spherical_harmonics_degree_zero_is_constant_and_higher_degrees_follow_closed_form():
    # Gaussian on the optical axis: viewing direction +z, where Y_l0 = sqrt((2l + 1) / 4pi).
    scene = single_gaussian(z=2.0, opacity=0.9)
    K = intrinsics(cx=12.5, cy=8.5)
    coefficients = torch.zeros(1, 16, 3)
    m0_bands = {0: 0, 1: 2, 2: 6, 3: 12}
    values = {0: [0.3, -0.2, 0.1], 1: [0.2, 0.1, -0.3], 2: [-0.1, 0.3, 0.2], 3: [0.15, -0.05, 0.1]}
    for degree, index in m0_bands.items():
        coefficients[0, index] = torch.tensor(values[degree])
    coefficients[0, [1, 3, 4, 5, 7, 8, 9, 10, 11, 13, 14, 15]] = 0.01 * torch.arange(36.0).reshape(12, 3)
    scene["colors"] = coefficients
    for degree in range(4):
        colors, alphas, _ = rasterization(**scene, viewmats=torch.eye(4)[None], Ks=K, width=WIDTH, height=HEIGHT,
                                          sh_degree=degree, render_mode="RGB", backend="torch")
        expected = 0.5 + sum(math.sqrt((2 * l + 1) / (4 * math.pi)) * torch.tensor(values[l])
                             for l in range(degree + 1))
        torch.testing.assert_close(colors[0, 8, 12] / alphas[0, 8, 12], expected.clamp_min(0), atol=1e-5, rtol=0)

    # Degree 0 is view independent; degree 1 differs between two cameras looking from different sides.
    scene["colors"] = torch.rand(1, 4, 3)
    yaw = math.degrees(math.atan2(0.9, 2.0))  # both cameras look straight at the Gaussian
    w2c = torch.tensor(np.stack([look_from(yaw, (-0.9, 0, 0)), look_from(-yaw, (0.9, 0, 0))]), dtype=torch.float32)
    renders = {}
    for degree in (0, 1):
        colors, alphas, info = rasterization(**scene, viewmats=w2c, Ks=intrinsics().repeat(2, 1, 1), width=WIDTH,
                                             height=HEIGHT, sh_degree=degree, render_mode="RGB", backend="torch")
        x, y = info["means2d"][:, 0].round().long().unbind(-1)
        renders[degree] = [colors[c, y[c], x[c]] / alphas[c, y[c], x[c]] for c in range(2)]
    constant = 0.5 + 0.28209479177387814 * scene["colors"][0, 0]
    for view in renders[0]:
        torch.testing.assert_close(view, constant.clamp_min(0), atol=1e-5, rtol=0)
    assert (renders[1][0] - renders[1][1]).abs().max() > 1e-2


def test_per_camera_colours_and_feature_channels():
    scene = random_scene(8, seed=3)
    w2c = torch.tensor(np.stack([np.eye(4), look_from(5.0, (0.1, 0, 0))]), dtype=torch.float32)
    features = torch.rand(2, 8, 5)
    colors, alphas, _ = rasterization(**{**scene, "colors": features}, viewmats=w2c, Ks=intrinsics().repeat(2, 1, 1),
                                      width=WIDTH, height=HEIGHT, render_mode="RGB", backend="torch")
    assert colors.shape == (2, HEIGHT, WIDTH, 5)
    single, _, _ = rasterization(**{**scene, "colors": features[1]}, viewmats=w2c[1:], Ks=intrinsics(), width=WIDTH,
                                 height=HEIGHT, render_mode="RGB", backend="torch")
    torch.testing.assert_close(colors[1:], single)


def test_gradcheck_float64():
    scene = {
        "means": torch.tensor([[0.05, -0.03, 1.6], [-0.1, 0.06, 2.0], [0.12, 0.08, 2.3]], dtype=torch.float64),
        "quats": torch.tensor([[0.9, 0.1, -0.2, 0.3], [0.5, -0.4, 0.3, 0.2], [1.0, 0.2, 0.1, -0.1]],
                              dtype=torch.float64),
        "scales": torch.tensor([[0.5, 0.3, 0.4], [0.4, 0.6, 0.35], [0.8, 0.4, 0.5]], dtype=torch.float64),
        "opacities": torch.tensor([0.5, 0.6, 0.4], dtype=torch.float64),
        "colors": torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.5], [0.4, 0.4, 0.9]], dtype=torch.float64),
    }
    names = list(scene)
    K = torch.tensor([[[8.0, 0.0, 4.9], [0.0, 8.0, 3.1], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    projection = torch.rand(8 * 6, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def render(*values):
        colors, alphas, _ = rasterization(**dict(zip(names, values)), viewmats=torch.eye(4, dtype=torch.float64)[None],
                                          Ks=K, width=8, height=6, render_mode="RGB+ED", backend="torch")
        return torch.einsum("pc,pck->k", colors.reshape(48, 4), projection), alphas.sum()

    # Every pixel is covered with alpha >= 1/255, so no pair sits at the skip threshold.
    with torch.no_grad():
        _, alphas, _ = rasterization(**scene, viewmats=torch.eye(4, dtype=torch.float64)[None], Ks=K, width=8,
                                     height=6, backend="torch")
    assert alphas.min() > 0.05
    inputs = tuple(scene[name].clone().requires_grad_(True) for name in names)
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_row_bands_give_the_same_image_and_gradients():
    scene = random_scene(20, seed=4)
    common = dict(viewmats=torch.eye(4)[None], Ks=intrinsics(), width=WIDTH, height=HEIGHT, backend="torch")
    results = []
    for max_pairs in (1 << 22, 60):
        leaves = {k: v.clone().requires_grad_(True) for k, v in scene.items()}
        colors, alphas, info = rasterization(**leaves, max_pairs=max_pairs, **common)
        (colors.square().sum() + alphas.sum()).backward()
        results.append((colors, alphas, {k: v.grad for k, v in leaves.items()}, info["means2d"].grad))
    (colors_a, alphas_a, grads_a, means2d_a), (colors_b, alphas_b, grads_b, means2d_b) = results
    torch.testing.assert_close(colors_a, colors_b, atol=1e-6, rtol=0)
    torch.testing.assert_close(alphas_a, alphas_b, atol=1e-6, rtol=0)
    torch.testing.assert_close(means2d_a, means2d_b, atol=1e-5, rtol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-5, msg=name)


def test_gradients_reach_every_parameter_and_means2d():
    scene = {k: v.clone().requires_grad_(True) for k, v in random_scene(10, seed=5).items()}
    colors, alphas, info = rasterization(**scene, viewmats=torch.eye(4)[None], Ks=intrinsics(), width=WIDTH,
                                         height=HEIGHT, backend="torch")
    (colors - 0.5).square().mean().backward()
    for name, value in scene.items():
        assert value.grad is not None and torch.isfinite(value.grad).all(), name
        assert (value.grad.abs().sum(-1) if value.dim() > 1 else value.grad.abs()).gt(0).all(), name
    visible = (info["radii"] > 0).all(-1)
    assert info["means2d"].grad.shape == (1, 10, 2)
    assert (info["means2d"].grad[visible].norm(dim=-1) > 0).all()


def test_backend_selection_on_cpu():
    scene = single_gaussian()
    common = dict(viewmats=torch.eye(4)[None], Ks=intrinsics(), width=WIDTH, height=HEIGHT)
    assert rasterization(**scene, **common)[2]["backend"] == "numba"  # auto on CPU tensors
    with pytest.raises(ModelUnavailableError, match="gsplat"):
        rasterization(**scene, backend="gsplat", **common)
    with pytest.raises(ParameterError, match="backend"):
        rasterization(**scene, backend="cuda", **common)
    with pytest.raises(ParameterError, match="packed"):
        rasterization(**scene, backend="torch", packed=True, **common)
    with pytest.raises(ParameterError, match="unknown rasterization argument"):
        rasterization(**scene, backend="torch", antialias=True, **common)
    with pytest.raises(ValueError, match="opacities"):
        rasterization(**{**scene, "opacities": torch.ones(2)}, backend="torch", **common)
    # Arguments that only tune gsplat's kernels are accepted and change nothing.
    plain = rasterization(**scene, backend="torch", **common)[0]
    tuned = rasterization(**scene, backend="torch", packed=False, tile_size=8, channel_chunk=16, **common)[0]
    torch.testing.assert_close(plain, tuned)


def test_antialiased_mode_dims_small_gaussians():
    scene = single_gaussian(z=4.0, opacity=0.8)
    scene["scales"] = torch.full((1, 3), 0.02)
    common = dict(viewmats=torch.eye(4)[None], Ks=intrinsics(cx=12.5, cy=8.5), width=WIDTH, height=HEIGHT,
                  render_mode="RGB", backend="torch")
    classic = rasterization(**scene, **common)[1][0, 8, 12, 0]
    antialiased = rasterization(**scene, rasterize_mode="antialiased", **common)[1][0, 8, 12, 0]
    # Projected variance 0.01 px^2 on both axes, blurred by 0.3: compensation sqrt(det ratio) = 0.01 / 0.31.
    torch.testing.assert_close(classic, torch.tensor(0.8))
    torch.testing.assert_close(antialiased, torch.tensor(0.8 * 0.01 / 0.31), atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_default_strategy_densifies_and_prunes_with_the_cpu_backends(backend: str):
    from gsplat.strategy import DefaultStrategy

    scene = random_scene(30, seed=6)
    params = torch.nn.ParameterDict({
        "means": scene["means"], "quats": scene["quats"], "scales": torch.log(scene["scales"]),
        "opacities": torch.logit(scene["opacities"]), "colors": scene["colors"]})
    params["opacities"].data[25:] = -10.0  # 5 nearly transparent Gaussians: never drawn, pruned
    optimizers = {name: torch.optim.Adam([param], lr=1e-3) for name, param in params.items()}
    strategy = DefaultStrategy(refine_start_iter=1, refine_every=2, refine_stop_iter=100, reset_every=1000,
                               grow_grad2d=1e-12, prune_opa=0.005)
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state(scene_scale=1.0)
    target = torch.rand(1, HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(0))
    counts = []
    for step in range(3):
        colors, _, info = rasterization(params["means"], params["quats"], torch.exp(params["scales"]),
                                        torch.sigmoid(params["opacities"]), params["colors"],
                                        torch.eye(4)[None], intrinsics(), WIDTH, HEIGHT, render_mode="RGB",
                                        backend=backend)
        strategy.step_pre_backward(params, optimizers, state, step, info)
        (colors - target).abs().mean().backward()
        visible = (info["radii"] > 0).all(-1)
        assert (info["means2d"].grad[visible].norm(dim=-1) > 0).all()
        strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        counts.append(len(params["means"]))
    # Step 2 refines: each of the 25 drawn Gaussians is duplicated or split (+1 each), 5 are pruned.
    assert counts == [30, 30, 30 + 25 - 5]
    assert all(len(param) == 50 for param in params.values())
    assert (torch.sigmoid(params["opacities"]) > 0.005).all()
    assert all(len(optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"]) == 50
               for optimizer in optimizers.values())
