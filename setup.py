"""megatron-rgm: Reflective Generative Model (policy + SPRM head) on megatron-core."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.4",
    "megatron-core>=0.16.1",
    "sentencepiece>=0.2",
    "zarr>=3",
    "safetensors>=0.4",
    "tqdm>=4.60",
    "numpy",
    # megatron-core's dist_checkpointing needs psutil but does not declare it.
    "psutil",
]

EXTRAS = {
    "dev": ["pytest>=8", "transformers>=4.45", "math-verify>=0.7", "matplotlib>=3.7", "tensorboard>=2.14"],
    "te": ["transformer-engine[pytorch]"],
}


def ext_modules():
    """The C++/CUDA extension megatron_rgm._C is added here (csrc/)."""
    return []


setup(
    name="megatron-rgm",
    version="0.1.0",
    description="Reflective Generative Model (policy + self-supervised process reward head) on megatron-core",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_rgm", "megatron_rgm.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=ext_modules(),
)
