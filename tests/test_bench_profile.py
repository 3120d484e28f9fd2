"""bench --profile: the kernel table (ranking, shares, CUDA kernels only) on hand-made events, the readable names of
PyTorch's templated kernels, and one real profile of the tiny bench on the CPU."""

import json
from types import SimpleNamespace

import pytest

from fdfo import bench
from fdfo.bench.profile import kernel_table, profile_markdown, short_name


def _event(key, count, device_us, cpu_us, device_type):
    return SimpleNamespace(key=key, count=count, self_device_time_total=device_us, self_cpu_time_total=cpu_us,
                           device_type=f"DeviceType.{device_type}")


class _Profile:
    def __init__(self, events):
        self.events = events

    def key_averages(self):
        return self.events


def test_kernel_table_ranks_cuda_kernels_by_device_time_with_their_share():
    prof = _Profile([_event("aten::linear", 10, 2500.0, 900.0, "CPU"),  # an operator (its kernels counted again)
                     _event("gemm", 4, 3000.0, 0.0, "CUDA"), _event("copy", 20, 1000.0, 0.0, "CUDA"),
                     _event("idle", 1, 0.0, 0.0, "CUDA"), _event("mul", 8, 2000.0, 0.0, "CUDA")])
    table = kernel_table(prof, "cuda", top=2)
    assert table["kind"] == "CUDA kernels" and table["total_ms"] == pytest.approx(6.0)
    assert [(r["name"], r["calls"]) for r in table["rows"]] == [("gemm", 4), ("mul", 8)]
    assert [r["share"] for r in table["rows"]] == pytest.approx([0.5, 1 / 3])
    cpu = kernel_table(prof, "cpu")
    assert [r["name"] for r in cpu["rows"]] == ["aten::linear"] and cpu["rows"][0]["share"] == 1.0


REAL = {  # names as torch 2.11 reported them on an H200 (cut after the part that names the operation)
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl<at::native::BinaryFunctor<float, float, "
    "float, at::native::binary_internal::MulFunctor<float> > >(at::TensorIteratorBase&)":
        "elementwise_kernel: Mul (float, inputs cast)",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::BinaryFunctor<"
    "c10::Half, c10::Half, c10::Half, at::native::binary_internal::MulFunctor<float> > >(at::TensorIteratorBase&)":
        "elementwise_kernel: Mul (Half)",
    "void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::Half>, std::array<char*, "
    "3ul> >(int, at::native::CUDAFunctor_add<c10::Half>, std::array<char*, 3ul>)":
        "vectorized_elementwise_kernel: add (Half)",
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::"
    "{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}, std::array<char*, 2ul>, "
    "4, TrivialOffsetCalculator<1, unsigned int>, at::native::memory::LoadWithCast<1> >(int)":
        "unrolled_elementwise_kernel: copy with cast (float)",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float, float, "
    "float>, unsigned int, float, 4, 4> >(at::native::ReduceOp<float>)": "reduce_kernel: Mean (float)",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>, "
    "unsigned int, 4, 64, 64>(int)": "CatArrayBatchedCopy",
    "nvjet_sm90_hsh_192x192_64x4_2x1_v_bz_coopB_bias_TNN": "nvjet_sm90_hsh_192x192_64x4_2x1_v_bz_coopB_bias_TNN",
}


@pytest.mark.parametrize("name", list(REAL))
def test_short_names_of_real_kernels(name):
    assert short_name(name) == REAL[name]


def test_tiny_bench_profiles_one_sampling_forward_and_one_micro_batch(tmp_path):
    out = tmp_path / "b.json"
    bench.main(["--tiny", "--profile", "--out", str(out)])
    profile = json.loads(out.read_text())["profile"]
    for key, batch in (("sample_forward", 2 * 2), ("train_micro_batch", None)):
        p = profile[key]
        assert p["kind"] == "CPU operators (self time)" and 1 <= len(p["rows"]) <= 15
        assert batch is None or p["batch"] == batch
        ms = [r["ms"] for r in p["rows"]]
        assert ms == sorted(ms, reverse=True) and sum(ms) <= p["total_ms"] + 1e-9
        assert sum(r["share"] for r in p["rows"]) == pytest.approx(sum(ms) / p["total_ms"])
    assert any("backward" in r["name"].lower() or "Backward" in r["name"] for r in profile["train_micro_batch"]["rows"])
    assert not any("backward" in r["name"].lower() for r in profile["sample_forward"]["rows"])
    text = "\n".join(profile_markdown(profile))
    assert "**one sampling forward** (4 rows)" in text and "**one training micro-batch**" in text
