"""TensorRT: profile and config generation and the FP16 ONNX the engines are built from (everywhere), FP16 engines
against onnxruntime (GPU only)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from loras import make_lora
from sdtrt.contract.errors import UsageError
from sdtrt.export.networks.descriptors import BATCH, CONTEXT, LATENT_H, LATENT_W, TEXT_BATCH, UNET_BATCH, descriptors
from sdtrt.export.tensorrt import EngineOptions, engine_filename, profile_shapes
from sdtrt.model_repository.build import write_repository
from sdtrt.model_repository.configs import JOBS, ServingOptions, all_configs, job_config, network_config
from sdtrt.requests.request import Txt2ImgRequest
from sdtrt.contract.spec import ENGINES, TXT2IMG, Catalog, load_spec


def has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


GPU_REASON = "needs an NVIDIA GPU and TensorRT (pip install 'sdtrt[gpu]'); this machine has " + (
    "no NVIDIA GPU" if not has_gpu() else "no tensorrt package")
needs_trt = pytest.mark.skipif(not (has_gpu() and importlib.util.find_spec("tensorrt")), reason=GPU_REASON)


def gpu(test):
    """A GPU test: selected by `pytest -m gpu`, skipped (saying why) where there is no GPU with TensorRT."""
    return pytest.mark.gpu(needs_trt(test))


def test_profiles_come_from_the_spec(exported_repo):
    spec = load_spec(exported_repo)
    unet = profile_shapes(spec, spec.component("unet"), EngineOptions())
    d = spec.dims
    assert unet["sample"] == [(d[UNET_BATCH].min, 4, d[LATENT_H].min, d[LATENT_W].min),
                              (d[UNET_BATCH].opt, 4, d[LATENT_H].opt, d[LATENT_W].opt),
                              (d[UNET_BATCH].max, 4, d[LATENT_H].max, d[LATENT_W].max)]
    assert unet["encoder_hidden_states"][2] == (d[UNET_BATCH].max, 3 * 77, 32)  # long prompts: 77..77*k
    assert unet["timestep"][0] == (d[UNET_BATCH].min,)
    text = profile_shapes(spec, spec.component("text_encoder"), EngineOptions())
    assert text["input_ids"] == [(1, 77), (2, 77), (d[TEXT_BATCH].max, 77)]
    static = profile_shapes(spec, spec.component("unet"), EngineOptions(static_size=(512, 384), static_batch=2))
    assert static["sample"] == [(2, 4, 48, 64), (4, 4, 48, 64), (4, 4, 48, 64)]  # 2 images: 2 rows, 4 with guidance
    decoder = profile_shapes(spec, spec.component("vae_decoder"), EngineOptions(static_batch=2))
    assert decoder["latent"][0][0] == decoder["latent"][2][0] == 2
    vae = profile_shapes(spec, spec.component("vae_encoder"), EngineOptions(static_size=(512, 384)))
    assert vae["image"][0] == (d[BATCH].min, 3, 384, 512) and vae["image"][2] == (d[BATCH].max, 3, 384, 512)
    with pytest.raises(UsageError, match="static-size 2048x512"):
        profile_shapes(spec, spec.component("unet"), EngineOptions(static_size=(2048, 512)))
    assert CONTEXT in spec.dims


def test_engine_names_carry_gpu_version_and_profile(exported_repo):
    spec = load_spec(exported_repo)
    shapes = profile_shapes(spec, spec.component("unet"), EngineOptions())
    name = engine_filename("unet", "NVIDIA H100 80GB HBM3", "10.7.0", shapes, True, False, 3)
    assert name.startswith("unet.NVIDIA-H100-80GB-HBM3.trt10.7.0.") and name.endswith(".plan")
    other = profile_shapes(spec, spec.component("unet"), EngineOptions(static_size=(512, 512)))
    assert engine_filename("unet", "NVIDIA H100 80GB HBM3", "10.7.0", other, True, False, 3) != name
    assert engine_filename("unet", "NVIDIA A100-SXM4-80GB", "10.7.0", shapes, True, False, 3) != name
    assert engine_filename("unet", "NVIDIA H100 80GB HBM3", "10.8.0", shapes, True, False, 3) != name


def fake_manifest(spec, options=EngineOptions()):
    return {name: {"file": f"{name}.GPU.trt10.7.0.0000.plan", "gpu": "GPU", "tensorrt": "10.7.0",
                   "profile": {k: [list(s) for s in v] for k, v in profile_shapes(spec, c, options).items()}}
            for name, c in spec.components.items()}


def with_engines(spec, manifest):
    """The spec as a TensorRT build leaves it: the engine manifest in it."""
    from dataclasses import replace

    return replace(spec, extra={**spec.extra, ENGINES: manifest})


def test_onnxruntime_runs_on_the_gpus_of_a_gpu_server(exported_repo):
    """Triton's onnxruntime backend with its networks (and the loops feeding them) on the GPUs when serving on a GPU
    machine; the CLI's --device says where, auto asking torch; the python backend's CPU engines refuse it."""
    from sdtrt.client.apps.cli import build_parser, serving_options

    spec = load_spec(exported_repo)
    catalog = Catalog(spec.key, {spec.key: spec})
    for gpu, kind in ((True, mc.ModelInstanceGroup.KIND_GPU), (False, mc.ModelInstanceGroup.KIND_CPU)):
        options = ServingOptions(backend="onnxruntime", gpu=gpu)
        assert network_config(spec, spec.component("unet"), options).instance_group[0].kind == kind
        assert job_config(catalog, JOBS[TXT2IMG], options).instance_group[0].kind == kind
    with pytest.raises(UsageError, match="python backend runs its networks on the CPU"):
        ServingOptions(backend="python", gpu=True)

    def gpu(*flags: str) -> bool:
        return serving_options(build_parser().parse_args(["configs", str(exported_repo), *flags]))["gpu"]

    assert gpu("--backend", "onnxruntime", "--device", "gpu") and not gpu("--backend", "onnxruntime", "--device", "cpu")
    assert gpu("--backend", "onnxruntime") is torch.cuda.is_available() and not gpu()
    with pytest.raises(UsageError, match="--device gpu .* needs --backend onnxruntime"):
        gpu("--device", "gpu")


def test_tensorrt_configs_from_the_same_generator(exported_repo, tmp_path):
    plain = load_spec(exported_repo)
    spec = with_engines(plain, fake_manifest(plain))
    options = ServingOptions(backend="tensorrt")
    unet = network_config(spec, spec.component("unet"), options)
    onnx = network_config(spec, spec.component("unet"), ServingOptions(backend="onnxruntime"))
    assert unet.platform == "tensorrt_plan" and onnx.platform == "onnxruntime_onnx"
    assert unet.default_model_filename == "unet.GPU.trt10.7.0.0000.plan"
    assert unet.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert [list(i.dims) for i in unet.input] == [list(i.dims) for i in onnx.input] == [[4, -1, -1], [1], [-1, 32]]
    assert unet.input[1].HasField("reshape") and list(unet.input[1].reshape.shape) == []
    assert unet.name == "default__unet"
    with pytest.raises(UsageError, match="model 'default' has no TensorRT engine for unet"):
        network_config(plain, plain.component("unet"), ServingOptions(backend="tensorrt"))
    repo = tmp_path / "repo"
    shutil.copytree(exported_repo, repo)
    write_repository(repo, Catalog(spec.key, {spec.key: spec}), options)
    config = text_format.Parse((repo / "default__unet" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.platform == "tensorrt_plan" and not (repo / "default__unet" / "1" / "model.py").exists()
    assert (repo / "txt2img" / "1" / "model.py").exists()  # the loop stays a Python model...
    scheduler = text_format.Parse((repo / "txt2img" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert scheduler.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU  # ...on the GPU, beside the engines
    cpu = ServingOptions(backend="python")
    assert network_config(spec, spec.component("unet"), cpu).instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    python_models = [c for c in all_configs(Catalog(spec.key, {spec.key: spec}), options) if c.backend == "python"]
    assert {c.name for c in python_models} >= {"default__tokenizer", "txt2img", "img2img"}
    for config in python_models:  # they read inputs with as_numpy(): CPU memory, asked for explicitly
        assert config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "yes", config.name


def triton_would_load(config: mc.ModelConfig, profile: dict) -> bool:
    """Triton's TensorRT backend's load-time rule (src/model_state.cc, AutoCompleteConfig): max_batch_size may not
    exceed the smallest max first dim of the engine profile's inputs; with max_batch_size 0 the config gives the
    engine's full shapes, which must fit every profile's range."""
    if config.max_batch_size > 0:
        return config.max_batch_size <= min(hi[0] for _, _, hi in profile.values())
    for tensor in config.input:
        lo, _, hi = profile[tensor.name]
        dims = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
        if len(dims) != len(lo) or any(d != -1 and not a <= d <= b for d, a, b in zip(dims, lo, hi)):
            return False
    return True


@pytest.mark.parametrize("options", [EngineOptions(), EngineOptions(static_batch=2), EngineOptions(static_batch=1),
                                     EngineOptions(static_size=(128, 96), static_batch=2)],
                         ids=["dynamic", "static-batch-2", "static-batch-1", "static-size-and-batch"])
def test_tensorrt_batch_limits_come_from_the_engine_profiles(exported_repo, options):
    """Each build's configs load under Triton's rule, batch where two requests can share a call, and a fixed-batch
    engine takes whole requests only (max_batch_size 0, its exact shapes, no dynamic batching)."""
    spec = load_spec(exported_repo)
    manifest = fake_manifest(spec, options)
    spec = with_engines(spec, manifest)
    serving = ServingOptions(backend="tensorrt")
    configs = {name: network_config(spec, spec.component(name), serving) for name in spec.components}
    for name, config in configs.items():
        assert triton_would_load(config, manifest[name]["profile"]), name
        assert config.HasField("dynamic_batching") == (config.max_batch_size > 1), name
    d = spec.dims
    assert configs["text_encoder"].max_batch_size == d[TEXT_BATCH].max  # --static-batch leaves the prompt rows
    assert configs["vae_encoder"].max_batch_size == d[BATCH].max  # img2img encodes 1 image, hires all of them
    n = options.static_batch
    if n is None:
        assert configs["unet"].max_batch_size == d[UNET_BATCH].max and configs["vae_decoder"].max_batch_size == d[BATCH].max
        return
    assert configs["unet"].max_batch_size == 2 * n  # n rows without guidance, 2n with
    decoder = configs["vae_decoder"]
    w, h = options.static_size or (-1, -1)
    f = spec.vae_scale_factor
    assert decoder.max_batch_size == 0 and not decoder.HasField("dynamic_batching")
    assert list(decoder.input[0].dims) == [n, 4, h // f if h > 0 else -1, w // f if w > 0 else -1]
    assert list(decoder.output[0].dims)[:2] == [n, 3]
    if options.static_size:
        assert list(configs["unet"].input[0].dims) == [4, h // f, w // f]


def test_static_engines_narrow_the_requests_they_serve(exported_repo):
    from sdtrt.contract.errors import InvalidRequest
    from sdtrt.export.tensorrt import served_spec
    from sdtrt.requests.plan import validate

    spec = load_spec(exported_repo)
    static = served_spec(spec, EngineOptions(static_size=(128, 96), static_batch=2))
    assert (static.field("width").default, static.field("height").default, static.field("batch_size").default) == (128, 96, 2)
    served = validate(Txt2ImgRequest(prompt="a fox", batch_size=None, hr_scale=None), static)  # absent: the spec's default
    assert (served.width, served.height, served.batch_size) == (128, 96, 2)
    with pytest.raises(InvalidRequest, match="invalid batch_size=1: batch_size must be an integer, from 2 to 2"):
        validate(Txt2ImgRequest(prompt="a fox", batch_size=1), static)
    with pytest.raises(InvalidRequest, match="invalid width=256"):
        validate(Txt2ImgRequest(prompt="a fox", width=256), static)
    again = served_spec(static, EngineOptions())  # a later dynamic build serves the export's whole range again
    assert again.request == spec.request
    with pytest.raises(UsageError, match="--static-batch 9: this export's batch_size must be an integer, from 1 to 4"):
        served_spec(spec, EngineOptions(static_batch=9))
    with pytest.raises(UsageError, match="--static-size 100x96"):
        served_spec(spec, EngineOptions(static_size=(100, 96)))


def test_configs_command_switches_to_tritons_onnxruntime_backend(exported_repo, tmp_path, capsys):
    from sdtrt.client.apps.cli import main

    repo = tmp_path / "repo"
    shutil.copytree(exported_repo, repo)
    assert main(["configs", str(repo), "--backend", "onnxruntime"]) == 0
    config = text_format.Parse((repo / "default__vae_decoder" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.platform == "onnxruntime_onnx" and not (repo / "default__vae_decoder" / "1" / "model.py").exists()


def test_build_engines_without_tensorrt_says_what_to_install(exported_repo, capsys):
    if importlib.util.find_spec("tensorrt"):
        pytest.skip("tensorrt is installed here")
    from sdtrt.client.apps.cli import main

    assert main(["build-engines", str(exported_repo)]) == 2
    assert "pip install 'sdtrt[gpu]'" in capsys.readouterr().err


# The FP16 bounds (the CPU tests of the FP16 ONNX use the per-component one too).
# FP16 keeps 11 significant bits (~5e-4 relative). One network pass accumulates a few such roundings through
# hundreds of layers, so per-component outputs are held to 2% of their scale. A whole generation feeds the U-Net's
# FP16 output back through every step, which can move individual pixels a lot on random weights, so the image is
# held to a mean absolute difference of 3/255 and a PSNR of 30 dB against the FP32 onnxruntime image, the usual
# bar for "visually identical" FP16 diffusion.
COMPONENT_TOLERANCE = 2e-2
IMAGE_MEAN_TOLERANCE = 3.0
IMAGE_PSNR_DB = 30.0


# --- the FP16 ONNX the FP16 engines are built from (everywhere: onnx and onnxruntime on the CPU) ------------------
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto
# TensorRT 11 removed these (its migration guide's removed-API lists, Python and C++); sdtrt's TensorRT code uses none.
REMOVED_IN_TENSORRT_11 = {
    "BuilderFlag.FP16", "BuilderFlag.BF16", "BuilderFlag.INT8", "BuilderFlag.FP8", "BuilderFlag.INT4",
    "BuilderFlag.FP4", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "BuilderFlag.PREFER_PRECISION_CONSTRAINTS",
    "BuilderFlag.DIRECT_IO", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH", "platform_has_fast_fp16",
    "platform_has_fast_int8", "platform_has_tf32", "int8_calibrator", "set_calibration_profile",
    "quantization_flags", "algorithm_selector", "device_memory_size", "create_execution_context_without_device_memory",
    "num_bindings", "get_binding_shape", "get_binding_dtype", "binding_is_input", "set_binding_shape",
    "execute_async_v2", "execute_v2", "set_dynamic_range", "set_output_type", "compute_precision",
    "parse_with_weight_descriptors", "supports_model",
}


@pytest.fixture(scope="module")
def fp16_onnx(exported_repo, tmp_path_factory):
    """network -> (its FP32 ONNX, its FP16 copy), converted once into a folder of their own."""
    from sdtrt.export.tensorrt import convert_to_fp16

    spec = load_spec(exported_repo)
    out = tmp_path_factory.mktemp("fp16")
    return {name: (exported_repo / c.onnx, convert_to_fp16(exported_repo / c.onnx, out / name / "model_fp16.onnx"))
            for name, c in spec.components.items()}


def typed_model(path):
    """The model and every tensor's element type (onnx's own type inference)."""
    import onnx

    from sdtrt.export.tensorrt import _elem_types

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    return model, _elem_types(model)


def test_fp16_onnx_is_valid_and_keeps_the_networks_interface(exported_repo, fp16_onnx):
    import onnx

    spec = load_spec(exported_repo)
    for name, (fp32_path, fp16_path) in fp16_onnx.items():
        assert fp16_path.name == "model_fp16.onnx"
        onnx.checker.check_model(str(fp16_path), full_check=True)
        fp32, fp16 = onnx.load(str(fp32_path)), onnx.load(str(fp16_path))
        for got, want in ((fp16.graph.input, fp32.graph.input), (fp16.graph.output, fp32.graph.output)):
            assert [(t.name, t.type) for t in got] == [(t.name, t.type) for t in want], name  # names, shapes, dtypes
        component = spec.component(name)
        elem = {"float32": FLOAT, "int32": onnx.TensorProto.INT32, "int64": onnx.TensorProto.INT64}
        assert [(t.name, t.type.tensor_type.elem_type) for t in (*fp16.graph.input, *fp16.graph.output)] == \
            [(t.name, elem[t.dtype]) for t in (*component.inputs, *component.outputs)], name  # the spec's dtypes


def test_fp16_onnx_has_fp16_weights_and_keeps_the_sensitive_ops_in_fp32(fp16_onnx):
    """Weights and compute in FP16 (convs, matmuls, attention's softmax: what diffusers runs in torch.float16);
    the normalisations, the timestep's sin/cos and its chain back to the timestep input, and float arithmetic on
    shapes (the attention scale) in FP32."""
    checked = set()
    for name, (_, path) in fp16_onnx.items():
        model, types = typed_model(path)
        graph = model.graph
        weights = {i.name: i for i in graph.initializer}
        producers = {o: n for n in graph.node for o in n.output}
        for init in weights.values():
            if init.data_type in (FLOAT, FLOAT16) and np.prod(init.dims) >= 1024:
                assert init.data_type == FLOAT16, (name, init.name)
        for node in graph.node:
            floats_in = [types[x] for x in node.input if x and types[x] in (FLOAT, FLOAT16)]
            if node.op_type in ("Conv", "MatMul", "Gemm"):
                assert floats_in and set(floats_in) == {FLOAT16}, (name, node.name)
                for x in node.input[1:]:  # the layer's weights: an initializer (or one through an Identity)
                    source = producers[x].input[0] if x in producers and producers[x].op_type == "Identity" else x
                    if source in weights:
                        assert weights[source].data_type == FLOAT16, (name, node.name, source)
                        checked.add("weights")
            elif node.op_type == "Softmax":
                assert floats_in == [FLOAT16], (name, node.name)
                checked.add("softmax")
            elif node.op_type in ("InstanceNormalization", "LayerNormalization"):
                assert set(floats_in) == {FLOAT} and types[node.output[0]] == FLOAT, (name, node.name)
                checked.add(node.op_type)
            elif node.op_type in ("Sin", "Cos"):
                assert floats_in == [FLOAT] and types[node.output[0]] == FLOAT, (name, node.name)
                chain, current = [], node  # back to the network's timestep input, every float in FP32
                while current.input[0] in producers:
                    current = producers[current.input[0]]
                    chain.append(current.op_type)
                    assert types[current.output[0]] == FLOAT, (name, current.name)
                assert current.input[0] == "timestep" and "Mul" in chain, (name, chain)
                checked.add("timestep")
            elif node.op_type == "Sqrt" and name == "unet":  # the attention scale, from the head size
                assert floats_in == [FLOAT], (name, node.name)
                checked.add("scale")
    assert checked == {"weights", "softmax", "InstanceNormalization", "LayerNormalization", "timestep", "scale"}


@pytest.mark.parametrize("name", ["unet", "vae_decoder", "text_encoder", "vae_encoder"])
def test_fp16_onnx_matches_fp32_in_onnxruntime(exported_repo, fp16_onnx, diffusers_pipe, name):
    """onnxruntime's CPU provider runs the FP16 graphs (where it has no FP16 kernel for an op it computes that op
    in FP32 between casts, so this checks the FP16 graph and the rounding of its weights and activations, not
    FP16 accumulation: the GPU tests hold TensorRT's to the same bound). Held to the per-component FP16 bound the
    GPU tests use, and visibly not FP32 any more."""
    import onnxruntime as ort

    spec = load_spec(exported_repo)
    desc = next(d for d in descriptors(diffusers_pipe, spec.text_max_length) if d.name == name)
    fp32_path, fp16_path = fp16_onnx[name]
    fp32 = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    fp16 = ort.InferenceSession(str(fp16_path), providers=["CPUExecutionProvider"])
    output = spec.component(name).outputs[0].name
    for dims in ({BATCH: 1, TEXT_BATCH: 2, UNET_BATCH: 2, LATENT_H: 8, LATENT_W: 8, CONTEXT: 77},
                 {BATCH: 2, TEXT_BATCH: 4, UNET_BATCH: 4, LATENT_H: 12, LATENT_W: 16, CONTEXT: 154}):
        torch.manual_seed(0)
        feed = {t.name: x.numpy() for t, x in zip(desc.inputs, desc.make_inputs(dims))}
        expected, = fp32.run([output], feed)
        actual, = fp16.run([output], feed)
        assert actual.dtype == np.float32 and actual.shape == expected.shape
        scale = max(1.0, float(np.abs(expected).max()))
        assert np.abs(actual - expected).max() <= COMPONENT_TOLERANCE * scale, (name, dims)
        assert np.abs(actual - expected).max() > 1e-5 * scale, (name, dims)  # it did compute in FP16


def test_fp16_conversion_depends_on_the_graph_only(fp16_onnx, tmp_path):
    """Refit needs the FP16 copy of re-exported weights to have the build's weights, names and types: the same
    graph with other weights converts to the same graph, the same weights to the same bytes."""
    import onnx
    from onnx import numpy_helper

    from sdtrt.export.tensorrt import convert_to_fp16

    fp32_path, fp16_path = fp16_onnx["unet"]
    again = convert_to_fp16(fp32_path, tmp_path / "again" / "model_fp16.onnx")
    assert again.read_bytes() == fp16_path.read_bytes()
    other = onnx.load(str(fp32_path))  # "a LoRA fused in": every float weight changed
    rng = np.random.default_rng(0)
    for i, init in enumerate(other.graph.initializer):
        if init.data_type == FLOAT:
            array = numpy_helper.to_array(init)
            other.graph.initializer[i].CopyFrom(numpy_helper.from_array(
                (array * rng.uniform(0.5, 1.5, array.shape)).astype(np.float32), init.name))
    (tmp_path / "other").mkdir()
    onnx.save(other, str(tmp_path / "other" / "model.onnx"))
    other_fp16 = convert_to_fp16(tmp_path / "other" / "model.onnx", tmp_path / "other" / "model_fp16.onnx")
    converted = onnx.load(str(other_fp16))
    reference = onnx.load(str(fp16_path))
    assert [(i.name, i.data_type, list(i.dims)) for i in converted.graph.initializer] == \
        [(i.name, i.data_type, list(i.dims)) for i in reference.graph.initializer]
    assert [(n.op_type, list(n.input), list(n.output)) for n in converted.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in reference.graph.node]


def test_fp16_onnx_of_a_large_network_keeps_its_weights_beside_it(fp16_onnx, tmp_path, monkeypatch):
    """Past FP16_EXTERNAL_DATA_BYTES (the SD U-Nets) the weights go to model_fp16.onnx.data, from an FP32 ONNX whose
    weights are external too (the exporter's layout past 2 GiB); a rebuild rewrites the file, never appends to it."""
    import onnx
    import onnxruntime as ort

    from sdtrt.export import tensorrt as module

    fp32_path, fp16_path = fp16_onnx["vae_decoder"]
    src = tmp_path / "fp32" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(onnx.load(str(fp32_path)), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    monkeypatch.setattr(module, "FP16_EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "fp16" / "model_fp16.onnx"
    module.convert_to_fp16(src, out)
    size = (out.parent / "model_fp16.onnx.data").stat().st_size
    module.convert_to_fp16(src, out)
    assert (out.parent / "model_fp16.onnx.data").stat().st_size == size > out.stat().st_size
    feed = {"latent": np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)}
    run = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
           for path in (out, fp16_path)]
    assert np.array_equal(*run)


def synthetic_model():
    """A small graph with what an export may hold beyond the default model's networks: an If whose branches read an
    outer tensor (and a value_float Constant), a Loop, a default-valued ConstantOfShape, float shape arithmetic,
    and outputs that are also read inside the graph."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W"),
               numpy_helper.from_array(np.ones(4, np.float32), "g"),
               numpy_helper.from_array(np.zeros(4, np.float32), "b"),
               numpy_helper.from_array(np.array(2, np.int64), "trips"), numpy_helper.from_array(np.array(True), "yes")]
    then = helper.make_graph([helper.make_node("Constant", [], ["two"], value_float=2.0),
                              helper.make_node("Mul", ["d", "two"], ["then_out"])], "then", [],
                             [helper.make_tensor_value_info("then_out", T.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["d"], ["else_out"])], "else", [],
                              [helper.make_tensor_value_info("else_out", T.FLOAT, None)])
    body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                              helper.make_node("Add", ["acc_in", "d"], ["acc_out"], name="loop_add")], "body",
                             [helper.make_tensor_value_info("iter", T.INT64, []),
                              helper.make_tensor_value_info("cond_in", T.BOOL, []),
                              helper.make_tensor_value_info("acc_in", T.FLOAT, None)],
                             [helper.make_tensor_value_info("cond_out", T.BOOL, []),
                              helper.make_tensor_value_info("acc_out", T.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]),
             helper.make_node("LayerNormalization", ["a", "g", "b"], ["ln"]),
             helper.make_node("Shape", ["a"], ["a_shape"]),
             helper.make_node("ConstantOfShape", ["a_shape"], ["zeros"]),
             helper.make_node("Add", ["ln", "zeros"], ["d"]),
             helper.make_node("If", ["cond"], ["i"], then_branch=then, else_branch=other),
             helper.make_node("Size", ["x"], ["n"]),
             helper.make_node("Cast", ["n"], ["n_float"], to=T.FLOAT),
             helper.make_node("Sqrt", ["n_float"], ["root"], name="root"),
             helper.make_node("Mul", ["i", "root"], ["e"]),
             helper.make_node("Add", ["e", "x"], ["y"]),
             helper.make_node("Relu", ["y"], ["z"]),
             helper.make_node("Loop", ["trips", "yes", "x"], ["looped"], body=body)]
    graph = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info("x", T.FLOAT, [2, 4]),
                                                   helper.make_tensor_value_info("cond", T.BOOL, [])],
                              [helper.make_tensor_value_info(n, T.FLOAT, [2, 4]) for n in ("y", "z", "looped")],
                              weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fp16_conversion_of_branches_loops_and_shape_arithmetic(tmp_path):
    import onnx
    import onnxruntime as ort

    from sdtrt.export.tensorrt import _graphs, convert_to_fp16

    onnx.save(synthetic_model(), str(tmp_path / "model.onnx"))
    out = convert_to_fp16(tmp_path / "model.onnx", tmp_path / "model_fp16.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    model, types = typed_model(out)
    assert [(t.name, t.type.tensor_type.elem_type) for t in model.graph.output] == [("y", FLOAT), ("z", FLOAT),
                                                                                     ("looped", FLOAT)]
    nodes = {n.name: n for g in _graphs(model.graph) for n in g.node}
    assert types["W"] == FLOAT16 and types["zeros"] == FLOAT16 and types["i"] == FLOAT16
    assert types[nodes["root"].input[0]] == FLOAT and types["root"] == FLOAT  # sqrt of a size: FP32
    assert [types[x] for x in nodes["loop_add"].input] == [FLOAT, FLOAT] and types["looped"] == FLOAT  # loop: FP32
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    for cond in (True, False):
        feed = {"x": x, "cond": np.array(cond)}
        expected, actual = (ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
                            for path in (tmp_path / "model.onnx", out))
        for got, want in zip(actual, expected):
            assert got.dtype == np.float32
            assert np.abs(got - want).max() <= COMPONENT_TOLERANCE * max(1.0, float(np.abs(want).max()))


def test_engine_build_asks_for_a_strongly_typed_network_and_no_precision_flag(exported_repo, tmp_path):
    """What build_engine hands polygraphy (its loaders, read without TensorRT): a strongly typed network, parsed
    with the parser's default flags, and a config with no precision flag (TensorRT 11 has none; TensorRT 10 builds
    the same engine from it). Building it is the GPU tests' part."""
    from sdtrt.export.tensorrt import engine_loaders

    spec = load_spec(exported_repo)
    shapes = profile_shapes(spec, spec.component("unet"), EngineOptions())
    network, config = engine_loaders(tmp_path / "model_fp16.onnx", shapes, refittable=True, level=4,
                                     timing_cache=tmp_path / "trt_timing.cache")
    assert network.strongly_typed is True and network.flags is None and not network.plugin_instancenorm
    assert network.path == str(tmp_path / "model_fp16.onnx")
    assert not (config.fp16 or config.bf16 or config.int8 or config.fp8 or config.tf32)
    assert config.precision_constraints is None and config.calibrator is None
    # an FP32 engine (build_engine asks for it when the network is not FP16) may use TF32, and only it
    _, fp32 = engine_loaders(tmp_path / "model.onnx", shapes, refittable=False, level=3,
                             timing_cache=tmp_path / "trt_timing.cache", tf32=True)
    assert fp32.tf32 and not (fp32.fp16 or fp32.bf16 or fp32.int8 or fp32.fp8)
    assert config.refittable and config.builder_optimization_level == 4 and config.timing_cache_path is None
    (profile,) = config.profiles
    assert {name: [tuple(s) for s in (profile[name].min, profile[name].opt, profile[name].max)] for name in profile} \
        == shapes


def test_tensorrt_code_uses_no_api_tensorrt_11_removed():
    """sdtrt's TensorRT code (the exporter's builds and refits, the engine checks, the runner), read as code."""
    import ast
    import inspect

    from sdtrt.pipeline import engines, runners
    from sdtrt.export import tensorrt as module

    for source in (module, engines, runners):
        tree = ast.parse(inspect.getsource(source))
        used = {ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        hits = {u for u in used for removed in REMOVED_IN_TENSORRT_11 if u == removed or u.endswith("." + removed)}
        assert not hits, (source.__name__, hits)
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "CreateConfig"):
            assert not {k.arg for k in call.keywords} & {"fp16", "bf16", "int8", "fp8", "precision_constraints"}


def test_engine_names_carry_the_fp16_conversion(exported_repo, monkeypatch):
    """An FP16 engine's name changes with the conversion that made its ONNX (and differs from the weakly typed
    engines an older sdtrt built), an FP32 engine's does not."""
    from sdtrt.export import tensorrt as module

    spec = load_spec(exported_repo)
    shapes = profile_shapes(spec, spec.component("unet"), EngineOptions())
    fp16 = engine_filename("unet", "GPU", "11.2.1", shapes, True, False, 3)
    fp32 = engine_filename("unet", "GPU", "11.2.1", shapes, False, False, 3)
    monkeypatch.setattr(module, "FP16_CONVERSION", "another-conversion")
    assert engine_filename("unet", "GPU", "11.2.1", shapes, True, False, 3) != fp16
    assert engine_filename("unet", "GPU", "11.2.1", shapes, False, False, 3) == fp32


# --- on a GPU ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt_repo(default_model, tmp_path_factory):
    from sdtrt.export import export_model
    from sdtrt.export.tensorrt import EngineOptions as Options

    out = tmp_path_factory.mktemp("trt") / "default"
    export_model(default_model, out, max_size=256, progress=False, report=lambda *_: None, engines=Options())
    return out


@gpu
@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_tensorrt_matches_onnxruntime_per_component(trt_repo, diffusers_pipe, name):
    from sdtrt.pipeline.local import LocalPipeline

    trt = LocalPipeline(trt_repo, backend="tensorrt")
    ort = LocalPipeline(trt_repo)
    spec = trt.spec
    desc = next(d for d in descriptors(diffusers_pipe, spec.text_max_length) if d.name == name)
    for dims in ({BATCH: 1, TEXT_BATCH: 2, UNET_BATCH: 2, LATENT_H: 8, LATENT_W: 8, CONTEXT: 77},
                 {BATCH: 2, TEXT_BATCH: 4, UNET_BATCH: 4, LATENT_H: 12, LATENT_W: 16, CONTEXT: 154}):
        torch.manual_seed(0)
        arrays = [x.numpy() for x in desc.make_inputs(dims)]
        output = spec.component(name).outputs[0].name
        expected = ort.run(name, *arrays)[output]
        actual = trt.run(name, *arrays)[output]
        scale = max(1.0, float(np.abs(expected).max()))
        assert np.abs(actual - expected).max() <= COMPONENT_TOLERANCE * scale, (name, dims)


@gpu
def test_tensorrt_image_matches_onnxruntime(trt_repo):
    from sdtrt.pipeline.local import LocalPipeline

    request = Txt2ImgRequest(prompt="a lighthouse at dawn", steps=20, seed=42, width=128, height=128)
    fp16 = LocalPipeline(trt_repo, backend="tensorrt").txt2img(request).images.astype(np.float64)
    fp32 = LocalPipeline(trt_repo).txt2img(request).images.astype(np.float64)
    mse = np.mean((fp16 - fp32) ** 2)
    assert np.abs(fp16 - fp32).mean() <= IMAGE_MEAN_TOLERANCE
    assert 10 * np.log10(255.0**2 / max(mse, 1e-12)) >= IMAGE_PSNR_DB


def test_refit_needs_refittable_engines(exported_repo, tmp_path):
    """Refit refuses engines built without --refittable, before touching anything (checked without a GPU)."""
    import shutil as sh

    from sdtrt.export import refit_repository

    repo = tmp_path / "repo"
    sh.copytree(exported_repo, repo)
    spec = load_spec(repo)
    manifest = {name: {**entry, "refittable": False} for name, entry in fake_manifest(spec).items()}
    with_engines(spec, manifest).save(repo)
    with pytest.raises(UsageError, match="not refittable: build them with --refittable"):
        refit_repository(repo, spec.source)


def test_a_refit_writes_new_engine_files_reloads_through_model_control_then_removes_the_old(
        default_model, exported_repo, tmp_path, monkeypatch):
    """`sdtrt refit --url` without a GPU: TensorRT's refit (the one function that needs TensorRT) copies the engine,
    and the engines are stand-in files. The new files are written beside the old, the manifest and the configs
    name them, the model is reloaded through model control while the old files are still there (the server held
    them), then the old files go. The reload is recorded, not served: a CPU tritonserver has no TensorRT backend
    to load a tensorrt_plan model (nor would TensorRT load a stand-in engine)."""
    from sdtrt import export
    from sdtrt.client.apps import models
    from sdtrt.client.apps.cli import main

    repo = tmp_path / "repo"
    shutil.copytree(exported_repo, repo)
    plain = load_spec(repo)
    manifest = {name: {**entry, "refittable": True, "fp16": False} for name, entry in fake_manifest(plain).items()}
    spec = with_engines(plain, manifest)
    spec.save(repo)
    write_repository(repo, Catalog(spec.key, {spec.key: spec}), ServingOptions(backend="tensorrt"))
    old = {name: repo / spec.triton_name(name) / "1" / entry["file"] for name, entry in manifest.items()}
    for name, path in old.items():
        path.write_bytes(f"{name} engine".encode())

    def copy_engine(engine_path, onnx_path, out_path, fp16=None):
        assert onnx_path.is_file() and fp16 is False  # the re-exported ONNX, the engine's own precision
        shutil.copyfile(engine_path, out_path)

    seen_at_reload = []

    class RecordingControl:
        def __init__(self, url, key=None):
            self.url = url

        def load(self, name: str) -> float:
            configs = {part: config_file(repo, spec, part) for part in manifest}
            seen_at_reload.append((self.url, name, configs, all(path.is_file() for path in old.values())))
            return 0.1

    monkeypatch.setattr(export, "refit_engine", copy_engine)
    monkeypatch.setattr(models, "ModelControl", RecordingControl)
    assert main(["refit", str(repo), str(default_model), "--url", "127.0.0.1:8001"]) == 0
    refitted = load_spec(repo).extra[ENGINES]
    new = {name: repo / spec.triton_name(name) / "1" / refitted[name]["file"] for name in manifest}
    assert [(url, name, all_old) for url, name, _, all_old in seen_at_reload] == [("127.0.0.1:8001", "default", True)]
    assert seen_at_reload[0][2] == {name: path.name for name, path in new.items()}  # the configs named the new ones
    for name in manifest:
        assert new[name].name != old[name].name and new[name].read_bytes() == f"{name} engine".encode()
        assert not old[name].exists()  # gone once the server holds the new ones
        assert config_file(repo, spec, name) == new[name].name


def config_file(repo, spec, part: str) -> str:
    """The engine file a network's config.pbtxt names."""
    config = text_format.Parse((repo / spec.triton_name(part) / "config.pbtxt").read_text(), mc.ModelConfig())
    return config.default_model_filename


@gpu
def test_refit_swaps_in_lora_weights(default_model, tmp_path):
    """A refittable engine refitted with a LoRA-fused checkpoint gives that checkpoint's engine output."""
    from sdtrt.export import export_model, refit_repository
    from sdtrt.export.tensorrt import EngineOptions as Options
    from sdtrt.pipeline.local import LocalPipeline
    lora = make_lora(default_model, tmp_path)
    repo = tmp_path / "repo"
    export_model(default_model, repo, max_size=256, progress=False, report=lambda *_: None,
                 engines=Options(refittable=True))
    refit_repository(repo, default_model, loras=(str(lora),), report=lambda *_: None)
    request = Txt2ImgRequest(prompt="a castle", steps=8, seed=1, width=128, height=128)
    refitted = LocalPipeline(repo, backend="tensorrt").txt2img(request).images.astype(np.float64)
    reference = LocalPipeline(repo).txt2img(request).images.astype(np.float64)  # the ONNX now carries the LoRA too
    assert np.abs(refitted - reference).mean() <= IMAGE_MEAN_TOLERANCE


@gpu
def test_refit_a_b_a_changes_the_output_and_restores_it_bit_exactly(default_model, diffusers_pipe, tmp_path):
    """A -> B -> A: refitting a LoRA changes the U-Net engine's output, refitting the plain weights back gives
    the very bytes the engine gave before (refit replaces weights; nothing else about the engine changes)."""
    from sdtrt.export import export_model, refit_repository
    from sdtrt.export.networks.descriptors import BATCH, CONTEXT, LATENT_H, LATENT_W, TEXT_BATCH, UNET_BATCH, descriptors
    from sdtrt.export.tensorrt import EngineOptions
    from sdtrt.pipeline.local import LocalPipeline
    lora = make_lora(default_model, tmp_path)
    repo = tmp_path / "repo"
    export_model(default_model, repo, max_size=256, progress=False, report=lambda *_: None,
                 engines=EngineOptions(refittable=True))
    desc = next(d for d in descriptors(diffusers_pipe, 77) if d.name == "unet")
    torch.manual_seed(0)
    arrays = [x.numpy() for x in desc.make_inputs(
        {BATCH: 1, TEXT_BATCH: 2, UNET_BATCH: 2, LATENT_H: 16, LATENT_W: 16, CONTEXT: 77})]

    def unet_output() -> np.ndarray:
        pipeline = LocalPipeline(repo, backend="tensorrt")
        return pipeline.run("unet", *arrays)[pipeline.spec.component("unet").outputs[0].name]

    a = unet_output()
    refit_repository(repo, default_model, loras=(f"{lora}:1.0",), report=lambda *_: None)
    b = unet_output()
    assert np.abs(b - a).max() > 1e-3  # the LoRA's weights are in the engine
    refit_repository(repo, default_model, report=lambda *_: None)
    assert np.array_equal(unet_output(), a)  # and the plain ones are back, bit for bit


@gpu
def test_fp16_engines_are_strongly_typed_builds_of_the_fp16_onnx(trt_repo, diffusers_pipe):
    """The default model's FP16 engines (TensorRT 10 or 11, one recipe): each built from its network's FP16 ONNX,
    inputs and outputs in the spec's dtypes, and each within the FP16 bound of onnxruntime's FP32 on the FP32 ONNX."""
    import onnxruntime as ort
    import tensorrt as trt

    from sdtrt.export.tensorrt import FP16_CONVERSION
    from sdtrt.pipeline.local import LocalPipeline

    pipeline = LocalPipeline(trt_repo, backend="tensorrt")
    spec = pipeline.spec
    manifest = spec.extra[ENGINES]
    dtypes = {"float32": trt.DataType.FLOAT, "int32": trt.DataType.INT32, "int64": trt.DataType.INT64}
    descs = {d.name: d for d in descriptors(diffusers_pipe, spec.text_max_length)}
    for name, component in spec.components.items():
        entry = manifest[name]
        folder = trt_repo / spec.triton_name(name) / "1"
        assert entry["fp16"] and entry["fp16_conversion"] == FP16_CONVERSION, name
        assert (folder / "model_fp16.onnx").is_file(), name
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine((folder / entry["file"]).read_bytes())
        for tensor in (*component.inputs, *component.outputs):
            assert engine.get_tensor_dtype(tensor.name) == dtypes[tensor.dtype], (name, tensor.name)
        reference = ort.InferenceSession(str(trt_repo / component.onnx), providers=["CPUExecutionProvider"])
        output = component.outputs[0].name
        torch.manual_seed(0)
        arrays = [x.numpy() for x in descs[name].make_inputs(
            {BATCH: 2, TEXT_BATCH: 4, UNET_BATCH: 4, LATENT_H: 12, LATENT_W: 16, CONTEXT: 154})]
        expected, = reference.run([output], {t.name: a for t, a in zip(component.inputs, arrays)})
        actual = pipeline.run(name, *arrays)[output]
        assert actual.dtype == np.float32 and actual.shape == expected.shape, name
        scale = max(1.0, float(np.abs(expected).max()))
        assert np.abs(actual - expected).max() <= COMPONENT_TOLERANCE * scale, name


def test_a_refit_writes_a_new_engine_file_named_by_its_weights():
    """Refit never rewrites the engine a running server holds: each set of weights gets its own file name, and a
    refit of a refit replaces the weights' part of the name rather than growing it."""
    from sdtrt.export.tensorrt import refitted_filename

    built = "unet.NVIDIA-H100.trt11.2.1.a1b2c3d4.plan"
    lora = refitted_filename(built, "0123456789abcdef")
    back = refitted_filename(lora, "fedcba9876543210")
    assert lora == "unet.NVIDIA-H100.trt11.2.1.a1b2c3d4.w0123456789.plan"
    assert back == "unet.NVIDIA-H100.trt11.2.1.a1b2c3d4.wfedcba9876.plan"
    assert len({built, lora, back}) == 3
