"""The dynamic Gaussian model: deformation field, Gaussians, losses, densification bookkeeping and
the 3DGS PLY format."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mono4d.data.errors import InputError


def random_field(seed: int = 0, canonical_time: float = 0.5, std: float = 0.1):
    """A deformation field with random (non-zero) weights: a genuinely non-trivial map (motions of
    a few tenths of its radius for ``std`` 0.1)."""
    from mono4d.models.deformation import DeformationConfig, DeformationField

    torch.manual_seed(seed)
    field = DeformationField(DeformationConfig(canonical_time=canonical_time), torch.tensor([0.1, -0.2, 3.0]), 1.5)
    with torch.no_grad():
        for parameter in field.parameters():
            parameter.normal_(0.0, std)
    return field


def test_deformation_is_invertible_and_identity_at_canonical_time():
    field = random_field()
    points = torch.randn(500, 3) + torch.tensor([0.1, -0.2, 3.0])
    times = torch.rand(500)
    with torch.no_grad():
        moved = field.to_time(points, times)
        back = field.to_canonical(moved, times)
        assert (moved - points).norm(dim=1).mean() > 0.05  # it really moves points
        assert torch.allclose(back, points, atol=1e-4)
        assert torch.allclose(field.to_time(points, 0.5), points, atol=1e-6)
        rotation, log_scale = field.shape_deltas(points, 0.5)
        assert torch.allclose(rotation, torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(500, 4), atol=1e-6)
        assert torch.allclose(log_scale, torch.zeros(500, 3), atol=1e-6)
        # transfer composes the two maps: frame a -> canonical -> frame b
        assert torch.allclose(field.transfer(field.to_time(points, 0.2), 0.2, 0.9), field.to_time(points, 0.9), atol=1e-4)
        rotation, _ = field.shape_deltas(points, 0.9)
        assert torch.allclose(rotation.norm(dim=1), torch.ones(500), atol=1e-5)
        # exact in double precision even for large, contorted motions
        wild = random_field(std=0.3).double()
        moved = wild.to_time(points.double(), times.double())
        assert (moved - points).norm(dim=1).mean() > 1.0
        assert torch.allclose(wild.to_canonical(moved, times.double()), points.double(), atol=1e-7)


def test_fresh_field_is_the_identity():
    from mono4d.models.deformation import DeformationField

    field = DeformationField()
    points = torch.randn(50, 3)
    with torch.no_grad():
        assert torch.equal(field.to_time(points, 0.1), points)


def test_quaternion_helpers_match_scipy():
    from scipy.spatial.transform import Rotation

    from mono4d.models.deformation import quaternion_multiply, rotate_vectors

    rng = np.random.default_rng(0)
    a, b = Rotation.random(20, random_state=1), Rotation.random(20, random_state=2)
    to_wxyz = lambda r: torch.tensor(np.roll(r.as_quat(), 1, axis=1), dtype=torch.float64)  # noqa: E731
    product = quaternion_multiply(to_wxyz(a), to_wxyz(b)).numpy()
    expected = np.roll((a * b).as_quat(), 1, axis=1)
    assert np.allclose(np.abs(np.sum(product * expected, axis=1)), 1.0, atol=1e-9)
    vectors = rng.normal(size=(20, 3))
    assert np.allclose(rotate_vectors(to_wxyz(a), torch.tensor(vectors)).numpy(), a.apply(vectors), atol=1e-9)


def plane_model(depth: float = 2.0, dynamic: bool = False):
    """A dense grid of small opaque Gaussians on the plane z = depth in front of an identity camera."""
    from mono4d.models.deformation import DeformationField
    from mono4d.models.gaussians import SceneModel, create_params

    xs, ys = np.meshgrid(np.linspace(-1.2, 1.2, 40), np.linspace(-1.0, 1.0, 34))
    means = torch.tensor(np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, depth)], 1), dtype=torch.float32)
    colors = torch.full((len(means), 3), 0.25)
    colors[:, 0] = 0.75
    params, variables = create_params(means, colors, torch.full((len(means), 3), 0.05),
                                      torch.full((len(means),), dynamic), sh_degree=1, opacity=0.99)
    return SceneModel(params, variables, DeformationField())


def test_render_plane_colour_and_depth():
    from mono4d.models.gaussians import render

    model = plane_model()
    K = torch.tensor([[60.0, 0, 32], [0, 60.0, 24], [0, 0, 1]])
    with torch.no_grad():
        out = render(model.params, model.variables, model.field, 0.3, K, torch.eye(4), 64, 48, 0,
                     torch.ones(3), backend="torch")
    assert out["rgb"].shape == (48, 64, 3) and out["depth"].shape == (48, 64)
    centre = out["rgb"][16:32, 20:44]
    assert torch.allclose(centre.mean(dim=(0, 1)), torch.tensor([0.75, 0.25, 0.25]), atol=0.03)
    assert torch.allclose(out["depth"][16:32, 20:44], torch.tensor(2.0), atol=0.02)
    assert out["alpha"][16:32, 20:44].min() > 0.98
    assert out["info"]["means2d"].shape == (1, len(model.params["means"]), 2)

def test_render_near_plane_hides_gaussians_close_to_the_lens():
    """A plane 0.1 units in front of the camera covers the view at the default near plane and is
    not drawn at near_plane 0.2 (the far plane behind it shows instead); the model's own
    near_plane comes from the training parameters it was saved with."""
    from mono4d.models.gaussians import NEAR_PLANE, SceneModel, render

    near, far = plane_model(depth=0.1), plane_model(depth=2.0)
    near.params["means"].data[:, :2] *= 0.05  # the same view coverage at 1/20 of the depth
    near.params["scales"].data.fill_(float(np.log(0.004)))
    params = {name: torch.cat([near.params[name], far.params[name]]) for name in near.params}
    variables = {name: torch.cat([near.variables[name], far.variables[name]]) for name in near.variables}
    K = torch.tensor([[60.0, 0, 32], [0, 60.0, 24], [0, 0, 1]])
    with torch.no_grad():
        default = render(params, variables, near.field, 0.0, K, torch.eye(4), 64, 48, 0, backend="torch")
        culled = render(params, variables, near.field, 0.0, K, torch.eye(4), 64, 48, 0, backend="torch",
                        near_plane=0.2)
    assert torch.allclose(default["depth"][20:28, 28:36], torch.tensor(0.1), atol=0.01)
    assert torch.allclose(culled["depth"][20:28, 28:36], torch.tensor(2.0), atol=0.02)
    assert SceneModel(params, variables, near.field).near_plane == NEAR_PLANE
    assert SceneModel(params, variables, near.field, meta={"train_params": {"near_plane": 0.2}}).near_plane == 0.2



def test_gaussians_at_moves_only_dynamic_gaussians():
    from mono4d.models.gaussians import gaussians_at

    model = plane_model(dynamic=False)
    model.field = random_field()
    model.variables["is_dynamic"][:100] = True
    with torch.no_grad():
        state = gaussians_at(model.params, model.variables, model.field, 0.9)
    moved = (state["means"] - model.params["means"]).norm(dim=1)
    assert moved[:100].min() > 0 and moved[100:].max() == 0
    assert state["rotation_delta"].shape == (100, 4) and torch.equal(state["dynamic"], torch.arange(100))


def test_save_and_load_model_round_trip(tmp_path):
    from mono4d.models.gaussians import SceneModel, load_model, save_model

    model = plane_model()
    model.field = random_field()
    model.meta = {"num_frames": 3, "times": [0.0, 0.5, 1.0]}
    save_model(tmp_path / "m.pt", model, {"step": 7})
    loaded, extra = load_model(tmp_path / "m.pt")
    assert isinstance(loaded, SceneModel) and extra == {"step": 7} and loaded.meta == model.meta
    for name, value in model.params.items():
        assert torch.equal(loaded.params[name], value.detach()) and loaded.params[name].requires_grad
    points = torch.randn(10, 3)
    with torch.no_grad():
        assert torch.allclose(loaded.field.to_time(points, 0.8), model.field.to_time(points, 0.8))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        load_model(tmp_path / "bad.pt")


def test_default_strategy_keeps_is_dynamic_aligned():
    """gsplat's DefaultStrategy runs on CPU with the torch rasterizer's info and carries the
    per-Gaussian is_dynamic flag through duplicate / split / prune."""
    from gsplat import DefaultStrategy

    from mono4d.models.gaussians import render

    model = plane_model()
    model.variables["is_dynamic"][::3] = True
    with torch.no_grad():
        model.params["sh0"][::3] += 1.0  # dynamic Gaussians have their own colour
        model.params["opacities"][5] = -10.0  # below the pruning threshold
    strategy = DefaultStrategy(refine_start_iter=0, refine_every=1, grow_grad2d=1e-9, grow_scale3d=0.02)
    variables = strategy.initialize_state(scene_scale=1.0)
    variables["is_dynamic"] = model.variables["is_dynamic"]
    optimizers = {name: torch.optim.Adam([value], lr=1e-3) for name, value in model.params.items()}
    K = torch.tensor([[60.0, 0, 32], [0, 60.0, 24], [0, 0, 1]])
    before = len(model.params["means"])
    out = render(model.params, variables, model.field, 0.0, K, torch.eye(4), 64, 48, 0, backend="torch")
    strategy.step_pre_backward(model.params, optimizers, variables, 1, out["info"])
    (out["rgb"] - 0.5).abs().mean().backward()
    strategy.step_post_backward(model.params, optimizers, variables, 1, out["info"], packed=False)
    after = len(model.params["means"])
    assert after != before and len(variables["is_dynamic"]) == after
    # the flag travelled with each Gaussian: dynamic ones are exactly those with the bright colour
    assert torch.equal(variables["is_dynamic"], model.params["sh0"][:, 0, 0].detach() > 1.4)


def test_ordinal_loss_and_pair_sampling():
    from mono4d.models.losses import ordering_accuracy, ordinal_depth_loss, sample_ordinal_pairs

    prior = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0])
    valid = torch.tensor([0, 1, 2, 3])
    generator = torch.Generator().manual_seed(0)
    a, b, order = sample_ordinal_pairs(prior, valid, 500, 1.5, generator)
    assert len(a) > 0 and torch.all((prior[a] - prior[b]).abs() > 1.5) and torch.all(order == torch.sign(prior[a] - prior[b]))
    same_order = ordinal_depth_loss(prior * 3.0, a, b, order, alpha=50.0, scale=3.0)
    reversed_order = ordinal_depth_loss(-prior, a, b, order, alpha=50.0, scale=3.0)
    assert same_order < 1e-3 and reversed_order > 1.99
    reference = np.arange(100, dtype=np.float32).reshape(10, 10) + 1
    assert ordering_accuracy(reference * 2, reference, 1000, 0.05) == 1.0
    assert ordering_accuracy(-reference, reference, 1000, 0.05) == 0.0


def test_physical_priors_vanish_for_rigid_motion():
    from scipy.spatial.transform import Rotation

    from mono4d.models.losses import knn_graph, physical_priors

    rng = np.random.default_rng(0)
    canonical = torch.tensor(rng.normal(size=(300, 3)), dtype=torch.float32)
    rotation = Rotation.from_rotvec([0.3, -0.5, 0.2])
    moved = torch.tensor(rotation.apply(canonical.numpy()) + [1.0, 2.0, 0.5], dtype=torch.float32)
    quaternion = torch.tensor(np.roll(rotation.as_quat(), 1), dtype=torch.float32).expand(300, 4)
    graph = knn_graph(canonical, 8)
    assert graph.index.shape == (300, 8) and torch.allclose(graph.weight.sum(1), torch.ones(300))
    rigid = physical_priors(canonical, moved, quaternion, graph)
    assert all(float(value) < 1e-4 for value in rigid.values())
    stretched = physical_priors(canonical, moved * torch.tensor([1.3, 1.0, 1.0]), quaternion, graph)
    assert stretched["rigidity"] > 0.05 and stretched["isometry"] > 0.05


def test_reprojection_loss_is_zero_for_exact_geometry():
    from mono4d.models.deformation import DeformationField
    from mono4d.models.losses import project_points, reprojection_loss

    K = torch.tensor([[50.0, 0, 40], [0, 50.0, 30], [0, 0, 1]])
    source, target = torch.eye(4), torch.eye(4)
    target[0, 3] = -0.2  # the target camera sits 0.2 to the right
    depth = torch.full((60, 80), 2.0)
    xy = torch.tensor([[20.5, 10.5], [40.5, 30.5], [70.5, 50.5]])
    world = torch.cat([(xy - 40.0) / 50.0 * 2.0, torch.full((3, 1), 2.0)], 1)
    world[:, 1] = (xy[:, 1] - 30.0) / 50.0 * 2.0
    expected, _ = project_points(world, K, target)
    static = torch.zeros(3, dtype=torch.bool)
    loss = reprojection_loss(DeformationField(), depth, xy, expected, static, K, source, K, target, 0.1, 0.4, 8.0)
    assert float(loss) < 1e-5
    wrong = reprojection_loss(DeformationField(), depth, xy, expected + 20.0, static, K, source, K, target, 0.1, 0.4, 8.0)
    assert float(wrong) == pytest.approx(1.0)


def test_psnr_and_ssim():
    from mono4d.models.losses import photometric_loss, psnr, ssim

    image = torch.rand(32, 40, 3)
    assert float(psnr(image, image)) > 100 and float(ssim(image, image)) == pytest.approx(1.0, abs=1e-4)
    noisy = (image + 0.1).clamp(0, 1)
    assert 15 < float(psnr(noisy, image)) < 25
    assert float(photometric_loss(image, image, 0.2)) == pytest.approx(0.0, abs=1e-4)


def test_ply_round_trip_and_layout(tmp_path):
    from mono4d.data.ply import read_ply, write_ply

    rng = np.random.default_rng(0)
    count = 57
    arrays = {"means": rng.normal(size=(count, 3)), "quats": rng.normal(size=(count, 4)),
              "log_scales": rng.normal(size=(count, 3)), "opacity_logits": rng.normal(size=count),
              "sh0": rng.normal(size=(count, 3)), "sh_rest": rng.normal(size=(count, 15, 3))}
    write_ply(tmp_path / "g.ply", **arrays)
    loaded = read_ply(tmp_path / "g.ply")
    for key, value in arrays.items():
        assert np.allclose(loaded[key], value.astype(np.float32)), key
    header = (tmp_path / "g.ply").read_bytes().split(b"end_header\n")[0].decode()
    names = [line.split()[-1] for line in header.splitlines() if line.startswith("property")]
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[9:54] == [f"f_rest_{i}" for i in range(45)] and names[54:] == [
        "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    # f_rest is channel-major (3DGS): f_rest_1 is coefficient 2 of the red channel
    raw = np.frombuffer((tmp_path / "g.ply").read_bytes().split(b"end_header\n")[1], "<f4").reshape(count, 62)
    assert np.isclose(raw[0, 9 + 1], arrays["sh_rest"][0, 1, 0]) and np.isclose(raw[0, 9 + 15], arrays["sh_rest"][0, 0, 1])
    write_ply(tmp_path / "d0.ply", **{**arrays, "sh_rest": None})
    assert read_ply(tmp_path / "d0.ply")["sh_rest"].shape == (count, 0, 3)
    (tmp_path / "bad.ply").write_bytes(b"ply\nformat ascii 1.0\nend_header\n")
    with pytest.raises(InputError):
        read_ply(tmp_path / "bad.ply")
