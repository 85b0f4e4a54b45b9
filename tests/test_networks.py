"""Tests for training/networks.py: shapes, options, init, gradient flow, param counts."""

import pytest
import torch

from fewstep.training.networks import MLP, PRESETS_NET, SongUNet, build_net, count_params


def wake(net):
    """Scale up the ~1e-5-initialised layers (EDM's init_zero) so that the conditioning
    inputs visibly change the output; at init they only enter through those layers."""
    with torch.no_grad():
        for m in net.modules():
            w = getattr(m, 'weight', None)
            if isinstance(w, torch.Tensor) and w.dim() >= 2 and 0 < w.abs().max() < 1e-3:
                w.mul_(1e4)
    return net


def small_unet(**kw):
    """A few-thousand-parameter U-Net that still has every kind of block (down, up, attention)."""
    base = dict(img_resolution=28, in_channels=1, out_channels=1, model_channels=8,
                channel_mult=(1, 2), num_blocks=1, attn_resolutions=(14,), dropout=0.0)
    base.update(kw)
    torch.manual_seed(0)
    return SongUNet(**base)


def inputs(b=3, c=1, r=28, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, r, r, generator=g), torch.rand(b, generator=g)


# ----------------------------------------------------------------------------
# SongUNet shapes and options.


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('res', [28, 32])
@pytest.mark.parametrize('label_dim', [0, 10])
def test_unet_output_shape(channels, res, label_dim):
    net = small_unet(img_resolution=res, in_channels=channels, out_channels=channels, label_dim=label_dim,
                     attn_resolutions=(res // 2,))
    x, t = inputs(c=channels, r=res)
    labels = torch.tensor([0, 3, 9]) if label_dim else None
    y = net(x, t, class_labels=labels)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_unet_three_levels_and_other_out_channels():
    net = small_unet(channel_mult=(1, 2, 2), out_channels=2)  # 28 -> 14 -> 7 and back
    x, t = inputs()
    assert net(x, t).shape == (3, 2, 28, 28)


def test_unet_output_layer_starts_near_zero_as_in_edm():
    """EDM's and the CUD authors' nets init the last conv with init_weight 1e-5 (a fresh net
    outputs ~0); out_init_weight still sets another scale."""
    net = small_unet().eval()
    x, t = inputs()
    w = net.dec['28x28_aux_conv'].weight
    assert 0 < w.abs().max() < 1e-4
    assert 0 < net(x, t).abs().max() < 1e-3
    big = small_unet(out_init_weight=0.2).eval()
    assert big(x, t).std() > 1e-2


def test_unet_depends_on_t():
    net = wake(small_unet()).eval()
    x, t = inputs()
    y0 = net(x, torch.full((3,), 0.1))
    y1 = net(x, torch.full((3,), 0.9))
    assert (y0 - y1).abs().max() > 1e-4


def test_unet_scalar_t_broadcasts():
    net = small_unet().eval()
    x, _ = inputs()
    y = net(x, torch.tensor(0.3))
    assert torch.allclose(y, net(x, torch.full((3,), 0.3)))


def test_unet_labels_one_hot_float_and_none():
    net = wake(small_unet(label_dim=4)).eval()
    x, t = inputs()
    labels = torch.tensor([0, 1, 3])
    y_int = net(x, t, class_labels=labels)
    y_float = net(x, t, class_labels=torch.nn.functional.one_hot(labels, 4).float())
    assert torch.allclose(y_int, y_float, atol=1e-6)
    y_other = net(x, t, class_labels=torch.tensor([2, 2, 2]))
    assert (y_int - y_other).abs().max() > 1e-4
    y_none = net(x, t)  # None = all-zero label
    assert torch.allclose(y_none, net(x, t, class_labels=torch.zeros(3, 4)))


def test_unet_label_dropout_in_train_only():
    net = wake(small_unet(label_dim=4, label_dropout=1.0))
    x, t = inputs()
    labels = torch.tensor([0, 1, 3])
    net.train()
    assert torch.allclose(net(x, t, class_labels=labels), net(x, t), atol=1e-6)
    net.eval()
    assert (net(x, t, class_labels=labels) - net(x, t)).abs().max() > 1e-4


def test_unet_two_times_depends_on_s():
    net = wake(small_unet(two_times=True)).eval()
    x, t = inputs()
    y0 = net(x, t, s=torch.zeros(3))
    y1 = net(x, t, s=t * 0.5)
    assert y0.shape == x.shape
    assert (y0 - y1).abs().max() > 1e-4
    with pytest.raises(ValueError):
        net(x, t)


def test_unet_two_times_not_symmetric():
    net = wake(small_unet(two_times=True)).eval()
    x, _ = inputs()
    a, b = torch.full((3,), 0.8), torch.full((3,), 0.2)
    assert (net(x, a, s=b) - net(x, b, s=a)).abs().max() > 1e-4


def test_unet_extra_heads():
    net = small_unet(extra_heads=2, out_init_weight=0.2).eval()  # a visible main output
    x, t = inputs()
    outs = net(x, t, heads=True)
    assert isinstance(outs, list) and len(outs) == 3
    assert all(o.shape == x.shape for o in outs)
    main, *heads = outs
    assert torch.allclose(main, net(x, t))
    assert main.std() > 1e-2
    for h in heads:
        assert h.abs().max() < 1e-3  # near-zero init
    # Without heads=True only the main output comes back.
    assert torch.is_tensor(net(x, t))


def test_unet_heads_list_without_extra_heads():
    net = small_unet().eval()
    x, t = inputs()
    outs = net(x, t, heads=True)
    assert isinstance(outs, list) and len(outs) == 1


def test_unet_return_features():
    net = small_unet(model_channels=8, channel_mult=(2, 2)).eval()
    x, t = inputs()
    y, f = net(x, t, return_features=True)
    assert torch.allclose(y, net(x, t))
    assert f.shape == (3, net.feature_channels, 28, 28)
    assert net.feature_channels == 16
    (y2, h), f2 = small_unet(extra_heads=1).eval()(x, t, heads=True, return_features=True)
    assert y2.shape == h.shape == x.shape and f2.shape[2:] == (28, 28)


def test_unet_prior_shakedrop():
    plain = wake(small_unet()).eval()
    shake = small_unet(prior_shakedrop=True).eval()
    shake.load_state_dict(plain.state_dict())  # same parameters, no extra ones
    x, _ = inputs()
    # phi(0.5) = 0.5: both scales are 1, identical to the plain net.
    half = torch.full((3,), 0.5)
    assert torch.allclose(shake(x, half), plain(x, half), atol=1e-6)
    for tv in (0.0, 0.1, 1.0):
        t = torch.full((3,), tv)
        y = shake(x, t)
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert (y - plain(x, t)).abs().max() > 1e-5


def test_unet_prior_shakedrop_phi():
    x, _ = inputs()
    plain = small_unet().eval()
    # phi = 0.5 scales every concatenation by 1 at every t: the plain net.
    even = small_unet(prior_shakedrop=True, shakedrop_phi=0.5).eval()
    even.load_state_dict(plain.state_dict())
    t = torch.full((3,), 0.9)
    assert torch.allclose(even(x, t), plain(x, t), atol=1e-6)
    # phi 0.25 and 0.75 scale the skips the opposite ways, so they differ away from t = 0.5.
    a = small_unet(prior_shakedrop=True, shakedrop_phi=0.25).eval()
    b = small_unet(prior_shakedrop=True, shakedrop_phi=0.75).eval()
    a.load_state_dict(plain.state_dict())
    b.load_state_dict(plain.state_dict())
    assert (a(x, t) - b(x, t)).abs().max() > 1e-5
    assert torch.allclose(a(x, torch.full((3,), 0.5)), b(x, torch.full((3,), 0.5)), atol=1e-6)
    with pytest.raises(ValueError, match="shakedrop_phi"):
        small_unet(prior_shakedrop=True, shakedrop_phi=1.5)


def test_unet_dropout_train_vs_eval():
    net = small_unet(dropout=0.5)
    x, t = inputs()
    net.train()
    assert (net(x, t) - net(x, t)).abs().max() > 0
    net.eval()
    assert torch.equal(net(x, t), net(x, t))


def test_unet_fourier_embedding_and_ncsn_filter():
    net = small_unet(embedding_type='fourier', channel_mult_noise=2, resample_filter=(1, 3, 3, 1)).eval()
    x, t = inputs()
    assert net(x, t).shape == x.shape


def test_unet_gradients_reach_every_parameter():
    net = small_unet(label_dim=3, two_times=True, extra_heads=2, dropout=0.1, prior_shakedrop=True)
    net.train()
    x, t = inputs()
    outs, feats = net(x, t, s=t * 0.5, class_labels=torch.tensor([0, 1, 2]), heads=True, return_features=True)
    loss = sum(o.square().mean() for o in outs) + feats.mean()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


# ----------------------------------------------------------------------------
# MLP.


def mlp_inputs(b=5, dim=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, dim, generator=g), torch.rand(b, generator=g)


def test_mlp_shapes_and_options():
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, depth=2, label_dim=3, two_times=True, extra_heads=2, emb_dim=16).eval()
    x, t = mlp_inputs()
    labels = torch.tensor([0, 1, 2, 0, 1])
    y = net(x, t, s=t / 2, class_labels=labels)
    assert y.shape == (5, 2)
    assert y.std() > 1e-2
    outs = net(x, t, s=t / 2, class_labels=labels, heads=True)
    assert len(outs) == 3 and all(o.shape == (5, 2) for o in outs)
    assert torch.allclose(outs[0], y)
    assert all(h.abs().max() < 1e-3 for h in outs[1:])
    y2, f = net(x, t, s=t / 2, class_labels=labels, return_features=True)
    assert torch.allclose(y2, y) and f.shape == (5, 32)
    with pytest.raises(ValueError):
        net(x, t)


def test_mlp_depends_on_t_s_and_labels():
    torch.manual_seed(0)
    net = wake(MLP(hidden=32, depth=2, label_dim=3, two_times=True)).eval()
    x, t = mlp_inputs()
    s = t / 2
    base = net(x, t, s=s, class_labels=torch.zeros(5, dtype=torch.long))
    assert (base - net(x, 1 - t, s=s, class_labels=torch.zeros(5, dtype=torch.long))).abs().max() > 1e-4
    assert (base - net(x, t, s=s * 0, class_labels=torch.zeros(5, dtype=torch.long))).abs().max() > 1e-4
    assert (base - net(x, t, s=s, class_labels=torch.ones(5, dtype=torch.long))).abs().max() > 1e-4


def test_mlp_defaults_and_no_norm():
    x, t = mlp_inputs()
    assert MLP()(x, t).shape == (5, 2)
    assert MLP(dim=3, hidden=16, depth=1, norm=False)(torch.randn(4, 3), torch.rand(4)).shape == (4, 3)


def test_mlp_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = MLP(hidden=32, depth=2, label_dim=3, two_times=True, extra_heads=1)
    x, t = mlp_inputs()
    outs, feats = net(x, t, s=t / 2, class_labels=torch.tensor([0, 1, 2, 0, 1]), heads=True, return_features=True)
    (sum(o.square().mean() for o in outs) + feats.mean()).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


# ----------------------------------------------------------------------------
# build_net, presets, parameter counts.


def build_preset(name, res=28, channels=1, **extra):
    return build_net(dict(PRESETS_NET[name], img_resolution=res, in_channels=channels, out_channels=channels, **extra))


def test_build_net_does_not_mutate_and_rejects_unknown_arch():
    cfg = dict(PRESETS_NET['tiny'], img_resolution=28, in_channels=1, out_channels=1)
    before = dict(cfg)
    assert isinstance(build_net(cfg), SongUNet)
    assert cfg == before
    assert isinstance(build_net(PRESETS_NET['mlp']), MLP)
    with pytest.raises(ValueError):
        build_net({'arch': 'transformer'})


def test_presets_have_only_network_keys():
    for cfg in PRESETS_NET.values():
        assert not {'img_resolution', 'in_channels', 'out_channels', 'label_dim', 'dim'} & set(cfg)


def test_param_count_tiny():
    net = build_preset('tiny')
    assert count_params(net) < 300_000
    x, t = inputs()
    assert net(x, t).shape == x.shape


def test_param_count_fmnist_matches_cud_authors():
    n = count_params(build_preset('fmnist'))
    assert abs(n - 2_160_000) / 2_160_000 < 0.05
    assert n == 2_155_201  # configs/mnist_de.json of the Catch-Up Distillation code


def test_param_count_fmnist_cpu():
    net = build_preset('fmnist-cpu')
    assert 300_000 <= count_params(net) <= 600_000
    x, t = inputs()
    assert net(x, t).shape == x.shape


def test_param_count_cifar10_ddpmpp():
    n = count_params(build_preset('cifar10', res=32, channels=3))
    assert n == 55_732_739  # EDM's DDPM++ CIFAR-10 net


def test_options_add_few_parameters():
    base = count_params(build_preset('tiny'))
    assert count_params(build_preset('tiny', prior_shakedrop=True)) == base
    assert base < count_params(build_preset('tiny', label_dim=10, two_times=True, extra_heads=1)) < 1.5 * base


def test_mlp_accepts_prior_shakedrop_as_a_no_op():
    # One CUD method config serves both nets; the MLP has no skip concatenations to scale.
    torch.manual_seed(0)
    a = MLP(hidden=16, depth=1).eval()
    b = MLP(hidden=16, depth=1, prior_shakedrop=True).eval()
    b.load_state_dict(a.state_dict())
    x, t = mlp_inputs()
    assert torch.equal(a(x, t), b(x, t))
