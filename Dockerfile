# aex: the explanation service (API, workers, trainer) in one image.
#
#   docker build -t aex:cpu  --build-arg VARIANT=cpu  .   # CPU-only torch (small)
#   docker build -t aex:cuda --build-arg VARIANT=cuda .   # CUDA torch (needs the NVIDIA
#                                                         # container toolkit at run time)
#
# The same image runs `aex serve` (default command), `aex worker` and `aex train`.
# Checkpoints in models/checkpoints/ are installed with the package; mount more at /models
# and set AEX_MODEL_DIRS=/models.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim

# --- a virtual environment with torch for the chosen variant --------------------------
FROM ${PYTHON_IMAGE} AS python-env
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

FROM python-env AS torch-cpu
# PyTorch's CPU-only wheels: no CUDA libraries, a fraction of the size.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url "${TORCH_CPU_INDEX}"

FROM python-env AS torch-cuda
# The default Linux wheels bundle the CUDA runtime; the host provides the driver.
RUN pip install torch==2.14.1 torchvision==0.29.1

# --- the project on top -------------------------------------------------------------
FROM torch-${VARIANT} AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY aex ./aex
COPY models ./models
COPY service ./service
COPY worker ./worker
# The versions CI ran (constraints.txt); torch is already there for the chosen variant.
RUN pip install -c constraints.txt . && python -c "import aex.cli, service.app, worker.process"

# --- runtime: the environment only, as an unprivileged user ---------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="aex" org.opencontainers.image.description="aex service (${VARIANT})"
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 aex && mkdir -p /models && chown aex /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    AEX_HOST=0.0.0.0 \
    AEX_PORT=8000
USER aex
WORKDIR /home/aex
EXPOSE 8000
# Without AEX_REDIS_URL, `aex serve` runs everything in this container (embedded Redis).
# It listens on all interfaces of the container, so authentication stays on (AEX_AUTH=on, the
# default): the first admin token is written to /home/aex/.config/aex/token.
CMD ["aex", "serve"]
