"""The request table (serving.protocol.INPUTS) as data: a synthetic input added to it reaches
the sampler's items, its range is checked, the configs, the client and the page (a number box,
checked, sent) carry it; and a table that does not name it refuses it in one line, never drops
it: in the client, on the page, and through gRPC in the sampler's own parse."""
from __future__ import annotations

import numpy as np
import pytest

from fewstep.serving import protocol
from fewstep.serving.protocol import Input, InvalidInput, ModelInfo, parse_request

GUIDANCE = Input("guidance", "FP32", True, "a synthetic input (its range is [0, 2])", lambda model: (0.0, 2.0),
                 default="none")


@pytest.fixture
def with_guidance(monkeypatch):
    """The table with one more input, as a new input would be added: one entry."""
    monkeypatch.setitem(protocol.INPUTS, GUIDANCE.name, GUIDANCE)  # the one dict every reader holds
    return protocol.INPUTS


def _info(num_classes=0) -> ModelInfo:
    spec = {"process": "flow", "grid": "uniform", "t_max": 1.0, "t_min": 0.0, "t_end": 0.0, "rho": 1.0,
            "jump_lands": "s", "gamma": 0.0, "max_steps": 8, "default_steps": 2}
    return ModelInfo("m", (2,), num_classes, spec, 4)


def _request(**extra):
    return {"seed": np.array([[1], [2]], np.int64), **extra}


def test_a_new_input_reaches_the_items_and_its_range_is_checked(with_guidance):
    items = parse_request(_info(), _request(guidance=np.array([[0.5], [1.5]], np.float32)))
    assert [it.extra for it in items] == [{"guidance": 0.5}, {"guidance": 1.5}]
    assert [it.seed for it in items] == [1, 2] and items[0].steps == 2  # the rest as before
    assert all(it.extra == {} for it in parse_request(_info(), _request()))  # optional: left out
    with pytest.raises(InvalidInput, match=r"^guidance: must be in \[0, 2\], got 3\.0$"):
        parse_request(_info(), _request(guidance=np.array([[0.5], [3.0]], np.float32)))
    with pytest.raises(InvalidInput, match=r"^guidance: expected dtype float32, got int64$"):
        parse_request(_info(), _request(guidance=np.array([[1], [1]], np.int64)))
    assert protocol.input_ranges(_info())["guidance"] == (0.0, 2.0)


def test_a_table_without_it_refuses_it():
    with pytest.raises(InvalidInput, match=r"^guidance: unknown input \(inputs are seed, steps, class_label, gamma\)$"):
        parse_request(_info(), _request(guidance=np.array([[0.5], [1.5]], np.float32)))


def test_required_and_conditional_inputs_come_from_the_table():
    with pytest.raises(InvalidInput, match="^seed: required input is missing$"):
        parse_request(_info(), {"steps": np.array([[1]], np.int64)})
    with pytest.raises(InvalidInput, match=r"^class_label: required by the class-conditional model 'm': an integer in \[0, 3\]$"):
        parse_request(_info(num_classes=4), _request())
    with pytest.raises(InvalidInput, match="^class_label: model 'm' is unconditional; send no class_label$"):
        parse_request(_info(), _request(class_label=np.array([[0], [1]], np.int64)))
    labels = [it.label for it in parse_request(_info(4), _request(class_label=np.array([[3], [0]], np.int64)))]
    assert labels == [3, 0]


def test_the_configs_and_the_client_carry_it(with_guidance):
    grpc = pytest.importorskip("tritonclient.grpc")
    from fewstep.serving.client import ServingError, build_inputs
    from fewstep.serving.repository import request_inputs

    config = "\n".join(request_inputs(_info()))
    assert '"guidance"' in config and "TYPE_FP32" in config and "in [0, 2]" in config
    sent = {i.name(): i for i in build_inputs(grpc, [1, 2], 3, guidance=[0.5, 1.5], gamma=0.25)}
    assert list(sent) == ["seed", "steps", "gamma", "guidance"]
    assert sent["guidance"].datatype() == "FP32" and sent["guidance"].shape() == [2, 1]
    # `fewstep generate` has a flag for it
    import argparse

    from fewstep.serving import cli
    parser = argparse.ArgumentParser()
    cli.add_generate_args(parser)
    args = parser.parse_args(["--model", "m", "--out", "o.png", "--guidance", "0.5"])
    assert cli._other_inputs(args, 3) == {"guidance": [0.5, 0.5, 0.5]}
    typo = r"guidanse: unknown input \(inputs are seeds, steps, class_labels, gamma, guidance\)"
    with pytest.raises(ServingError, match=typo):  # a keyword the table does not name is refused, not dropped
        build_inputs(grpc, [1], guidanse=[0.5])


def _meta(num_classes=0):
    from fewstep.serving.client import ModelMeta
    return ModelMeta("m", (1, 28, 28), num_classes, 8, 2, 4, 0.0, ("image",))


def test_the_page_has_a_box_for_it_and_checks_it(with_guidance):
    pytest.importorskip("gradio", reason="the page needs gradio (the demo extra)")
    from fewstep.demo.app import build_app
    from fewstep.demo.checks import BadInput, check_request

    assert check_request(_meta(), 2, guidance=0.5).values == {"guidance": 0.5}
    assert check_request(_meta(), 2, guidance=None).values == {}  # left empty: not sent
    with pytest.raises(BadInput, match=r"^guidance: must be a number in \[0, 2\], got 3$"):
        check_request(_meta(), 2, guidance=3)
    app = build_app("127.0.0.1:1")  # nothing is called while the page is built
    labels = [c.get("props", {}).get("label") for c in app.config["components"]]
    assert "guidance: a synthetic input (its range is [0, 2])" in labels


def test_the_page_refuses_an_input_the_table_does_not_name():
    from fewstep.demo.checks import BadInput, check_request

    with pytest.raises(BadInput, match=r"^guidance: unknown input \(the server's inputs are seed, steps, class_label, gamma\)$"):
        check_request(_meta(), 2, guidance=0.5)


def test_through_grpc_a_sampler_without_it_refuses_it(with_guidance, served_model_dirs, tmp_path):
    """A repository written with the input (the configs and the ensemble pass it on) served by
    stubs whose table lacks it: the sampler's parse refuses it, and the client says so."""
    pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the serve extra)")
    from conftest import require_triton, running_server

    from fewstep.demo.backend import Backend
    from fewstep.demo.checks import describe_error
    from fewstep.serving.client import Client, ServingError
    from fewstep.serving.repository import Options, write_repository

    require_triton()
    repo = tmp_path / "repo"
    written = write_repository(repo, [str(served_model_dirs["tiny"])], Options(device="cpu", threads=1, instances=1))
    assert '"guidance"' in (repo / "tiny_sampler" / "config.pbtxt").read_text()
    with running_server(repo, written) as server, Client(server.grpc_url, timeout=60) as client:
        with pytest.raises(ServingError) as refused:
            client.generate("tiny", [1, 2], 2, guidance=[0.5, 0.5])
        assert refused.value.code == "INVALID_ARGUMENT"
        assert "guidance: unknown input (inputs are seed, steps, class_label, gamma)" in str(refused.value)
        assert client.generate("tiny", [1, 2], 2).shape == (2, 28, 28, 1)  # the same request without it is served
        # the page's way to the server (demo.backend), and what the page says
        with pytest.raises(ServingError) as from_page:
            Backend(server.grpc_url).generate("tiny", [1, 2], 2, guidance=0.5)
        said = describe_error(from_page.value, server.grpc_url)
        assert "rejected" in said and "guidance: unknown input" in said, said
