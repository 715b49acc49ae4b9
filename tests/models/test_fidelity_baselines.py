"""The baselines as their authors built them: Block-Recurrent (meliad) state IDs, weight-decay exemptions and the
fixed gate's update written out; GSS's DSS kernel and the GSS layer against references written from the papers'
equations (not rebuilt from the layer's own submodules)."""

import math

import pytest
import torch
from helpers.models import small_overrides

from blockstate.layers import S4DKernel
from blockstate.layers.gss import DSSKernel, GatedStateSpaceLayer
from blockstate.layers.recurrent import BlockRecurrentLayer
from blockstate.models import BlockRecurrentConfig, GatedStateSpaceConfig
from blockstate.ops import dss_init, dss_kernel, dss_kernel_reference
from blockstate.registry import create_model, model_config
from blockstate.training import TrainConfig, build_optimizer, group_of_parameters


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


# -- Block-Recurrent Transformer (meliad) -------------------------------------------------------------------------
def brect_layer(**extra) -> BlockRecurrentLayer:
    torch.manual_seed(0)
    return BlockRecurrentLayer(BlockRecurrentConfig(**{**small_overrides("brect"), "recurrent_layers": [0], **extra}))


def test_state_ids_are_added_after_the_states_norm():
    """meliad: keys/values/queries of the states come from norm(c) + ids. So scaling the state changes nothing
    the states show the attention, and the IDs still tell identical states apart."""
    layer = brect_layer().double()
    c = torch.randn(2, 4, 32, dtype=torch.float64)
    norm = layer.attention.context_norm
    expected = rms(c, norm.weight, norm.eps) + layer.state_ids
    assert torch.allclose(norm(c), expected, atol=1e-12)
    k, v = layer.attention.context_keys_values(c)
    k5, v5 = layer.attention.context_keys_values(5 * c)
    assert torch.allclose(k, k5, atol=1e-5) and torch.allclose(v, v5, atol=1e-5)  # up to the norm's eps
    same = c[:, :1].expand(-1, 4, -1)  # four identical states
    k_same, _ = layer.attention.context_keys_values(same)
    assert (k_same[:, 0] - k_same[:, 1]).abs().max() > 0.1


def test_state_ids_and_initial_state_start_at_unit_scale_in_a_model():
    """meliad initialises the state IDs N(0, 1) (they sit after the norm, beside unit-RMS states); the project's
    initializer_range (0.02) must not overwrite them when the PreTrainedModel initialises."""
    torch.manual_seed(0)
    model = create_model("brect", "tiny")  # S = W = 64 states of D = 256
    layer = next(m for m in model.modules() if isinstance(m, BlockRecurrentLayer))
    for p in (layer.state_ids, layer.initial_state):
        assert p.shape == (64, 256)
        assert abs(p.detach().std().item() - 1.0) < 0.05 and abs(p.detach().mean().item()) < 0.05


def test_initial_state_and_state_ids_are_exempt_from_weight_decay():
    torch.manual_seed(0)
    model = create_model("brect", "tiny", **small_overrides("brect"))
    groups = group_of_parameters(model)
    names = [n for n in groups if n.endswith(("initial_state", "state_ids"))]
    assert len(names) == 2, names
    assert all(groups[n] == "no_decay" for n in names)
    assert groups["model.layers.1.state_queries.weight"] == "decay"  # a projection keeps its decay
    opt = build_optimizer(model, groups, TrainConfig(weight_decay=0.1))
    params = dict(model.named_parameters())
    for name in names:
        group = next(g for g in opt.param_groups if any(p is params[name] for p in g["params"]))
        assert group["weight_decay"] == 0.0


def hand_state_update(layer: BlockRecurrentLayer, c: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor) -> torch.Tensor:
    """z of the state path written out from the layer's weights: s = norm(c) + ids; the states' self-attention
    over s and cross-attention to the block's keys/values; heads concatenated self first; one projection."""
    attn = layer.attention
    heads, d = attn.num_heads, attn.head_dim
    s = rms(c, attn.context_norm.weight, attn.context_norm.eps) + layer.state_ids
    q = (s @ layer.state_queries.weight.T).unflatten(-1, (2, heads, d))  # (B, S, 2, H, d)
    kv = (s @ attn.kv_cross.weight.T).unflatten(-1, (heads, 2 * d))  # (B, S, H, 2d): per head [k | v]
    k_s, v_s = kv[..., :d], kv[..., d:]
    outs = []
    for h in range(heads):
        scores = q[:, :, 0, h] @ k_s[:, :, h].transpose(1, 2) / math.sqrt(d)
        outs.append(scores.softmax(-1) @ v_s[:, :, h])
    for h in range(heads):
        scores = q[:, :, 1, h] @ keys[:, h].transpose(1, 2) / math.sqrt(d)
        outs.append(scores.softmax(-1) @ values[:, h])
    return torch.cat(outs, -1) @ layer.state_out.weight.T


def test_fixed_gate_mixes_state_and_update_exactly():
    """c' = c * g + z * (1 - g), g = sigmoid(b) per channel, with z nonzero and computed by hand."""
    layer = brect_layer().double()
    with torch.no_grad():
        layer.gate_bias.copy_(torch.randn(32, dtype=torch.float64) * 2)  # a different g per channel
    c = torch.randn(2, 4, 32, dtype=torch.float64)
    keys, values = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        z = hand_state_update(layer, c, keys, values)
        g = torch.sigmoid(layer.gate_bias)
        got = layer.update_state(c, keys, values)
    assert z.abs().mean() > 0.01  # the z * (1 - g) term is really exercised
    assert torch.allclose(got, c * g + z * (1 - g), atol=1e-12)


# -- GSS: the DSS kernel -----------------------------------------------------------------------------------------
def random_dss(h: int, n: int) -> dict[str, torch.Tensor]:
    """DSS parameters away from their initial values (random decay rates and frequencies), so the kernel's every
    term matters."""
    values = dss_init(h, n)
    values["log_lambda_re"] = torch.randn(n) - 1
    values["lambda_im"] = torch.randn(n) * 3
    values["log_dt"] = torch.empty(h).uniform_(math.log(1e-2), math.log(0.5))
    return values


@pytest.mark.parametrize("h,n,length", [(3, 7, 50), (5, 64, 300), (2, 512, 33)])
def test_dss_kernel_matches_its_formula(h, n, length):
    p = random_dss(h, n)
    fast = dss_kernel(p["log_dt"], p["log_lambda_re"], p["lambda_im"], p["w"], length)
    ref = dss_kernel_reference(p["log_dt"], p["log_lambda_re"], p["lambda_im"], p["w"], length)
    assert fast.shape == (h, length) and fast.dtype == torch.float32
    assert (fast.double() - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_dss_init_shares_the_modes_and_decays():
    p = dss_init(6, 512)
    assert p["log_lambda_re"].shape == p["lambda_im"].shape == (512,) and p["w"].shape == (6, 512, 2)
    assert torch.allclose(-p["log_lambda_re"].exp(), torch.full((512,), -0.5))
    assert abs(p["w"].var().item() - 1.0) < 0.05
    assert ((p["log_dt"] >= math.log(1e-3)) & (p["log_dt"] <= math.log(1e-1))).all()


# -- GSS: the layer against the paper's equations ----------------------------------------------------------------
def gss_config(**extra) -> GatedStateSpaceConfig:
    return GatedStateSpaceConfig(**{**small_overrides("gss-hybrid"), "gss_state_size": 16, **extra})


def paper_gss(layer: GatedStateSpaceLayer, x: torch.Tensor) -> torch.Tensor:
    """GSS from Mehta et al.'s equations, in float64 from the layer's parameters: v = GELU(W_v u) (wide),
    s = GELU(W_s u) (narrow), y_t = sum_{j<=t} K_(t-j) s_j + D s_t with the DSS-EXP kernel built in complex
    arithmetic (Lambda shared by the channels), x + W_o((W_uc y) * v). A naive O(L^2) convolution."""
    gelu = torch.nn.functional.gelu
    kern = layer.ssm.kernel
    x = x.double()
    u = rms(x, layer.norm.weight.double(), layer.norm.eps)
    v = gelu(u @ layer.wide.weight.double().T)
    s = gelu(u @ layer.narrow.weight.double().T)  # (B, L, H)
    lam = torch.complex(-kern.log_lambda_re.double().exp(), kern.lambda_im.double())  # (N,)
    dt = kern.log_dt.double().exp()  # (H,)
    w = torch.complex(kern.w[..., 0].double(), kern.w[..., 1].double())  # (H, N)
    skip = layer.ssm.skip[:, 0].double()  # D
    length = x.shape[1]
    y = torch.zeros_like(s)
    for c in range(s.shape[-1]):
        taps = [sum(w[c, k] * (torch.exp(dt[c] * lam[k]) - 1) / lam[k] * torch.exp(dt[c] * lam[k] * lag)
                    for k in range(lam.shape[0])).real for lag in range(length)]
        for t in range(length):
            y[:, t, c] = sum(taps[t - j] * s[:, j, c] for j in range(t + 1)) + skip[c] * s[:, t, c]
    return x + ((y @ layer.expand.weight.double().T) * v) @ layer.out.weight.double().T


def test_gss_layer_follows_the_papers_equations():
    torch.manual_seed(0)
    layer = GatedStateSpaceLayer(gss_config()).eval()
    kern = layer.ssm.kernel
    assert isinstance(kern, DSSKernel)
    with torch.no_grad():  # move every parameter off its initial value: nothing may be silently ignored
        for p in (kern.log_lambda_re, kern.lambda_im):
            p.add_(torch.randn_like(p) * 0.3)
        layer.norm.weight.add_(torch.randn_like(layer.norm.weight) * 0.3)
        layer.expand.weight.mul_(20)  # init scale 0.02: make the SSM branch count in the output
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        got, want = layer(x), paper_gss(layer, x)
    assert (got.double() - want).abs().max() < 1e-5
    assert (want - x.double()).abs().max() > 1e-3  # the branch is not vanishingly small


def test_gss_kernel_parameters_are_fp32_and_ssm_tagged():
    torch.manual_seed(0)
    model = create_model("gss-hybrid", "tiny", **small_overrides("gss-hybrid"))
    groups = group_of_parameters(model)
    kernels = [(n, m) for n, m in model.named_modules() if isinstance(m, DSSKernel)]
    assert len(kernels) == 2
    for name, kern in kernels:
        assert kern.w.shape == (8, 512, 2) and kern.log_lambda_re.shape == (512,) and kern.log_dt.shape == (8,)
        for pname, p in kern.named_parameters():
            assert p.dtype == torch.float32 and getattr(p, "_ssm", False)
            assert groups[f"{name}.{pname}"] == "ssm"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels[0][1](16).dtype == torch.float32


def test_gss_paper_preset_is_the_papers_layer():
    config = model_config("gss-hybrid", "paper")
    assert (config.hidden_size, config.gss_hidden_size, config.gss_narrow_size) == (1024, 4096, 256)
    assert (config.gss_kernel, config.gss_state_size, config.num_hidden_layers) == ("dss", 512, 16)
    assert config.attention_layers == [3, 7, 11, 15]
    defaults = GatedStateSpaceConfig(hidden_size=64)
    assert (defaults.gss_hidden_size, defaults.gss_narrow_size, defaults.gss_kernel) == (256, 16, "dss")


def test_gss_kernel_option_keeps_the_projects_kernels():
    layer = GatedStateSpaceLayer(gss_config(gss_kernel="s4d"))
    assert isinstance(layer.ssm.kernel, S4DKernel)
    x = torch.randn(1, 9, 32)
    assert layer(x).shape == x.shape
    with pytest.raises(ValueError, match="gss_kernel"):
        gss_config(gss_kernel="s5")
    with pytest.raises(ValueError, match="gss_state_size"):
        gss_config(gss_state_size=0)
