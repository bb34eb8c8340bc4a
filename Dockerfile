# tdr on a CUDA runtime: guidance generation and guided training on NVIDIA GPUs.
#   docker build -t tdr .
#   docker run --gpus all -v $HOME/.cache/huggingface:/root/.cache/huggingface -v $PWD/data:/data tdr \
#       generate-guidance --dataset gopro --root /data/GOPRO_Large --store /data/gopro.zarr
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/tdr
ENV PATH=/opt/tdr/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY __init__.py cli.py demo.py errors.py ./
COPY cache ./cache
COPY pipeline ./pipeline
COPY guided ./guided
COPY runs ./runs

# CUDA build of torch from the PyTorch index, then tdr with the GPU and remote-store extras.
RUN pip install --index-url https://download.pytorch.org/whl/cu128 torch \
    && pip install ".[gpu,remote]"

WORKDIR /work
ENTRYPOINT ["tdr"]
CMD ["--help"]
