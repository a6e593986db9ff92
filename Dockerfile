# sd3serve in a container. The default build is CPU-only and serves the embedded demo model:
#   docker build -t sd3serve .
#   docker run -p 8000:8000 -v sd3serve-data:/data sd3serve
#   docker run --rm -v sd3serve-data:/data sd3serve keys create --credits 100     # prints a key
# CUDA variant: the same file with PyTorch's CUDA wheels (they bring their own CUDA libraries; the host needs the
# NVIDIA driver and the NVIDIA Container Toolkit):
#   docker build -t sd3serve:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker run --gpus all -p 8000:8000 -v /models:/models:ro sd3serve:cuda serve --model /models/sd3.5-large-turbo
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, from the chosen index: PyPI's default torch wheel pulls GBs of CUDA libraries a CPU image never uses.
RUN python -m venv /opt/sd3serve \
    && /opt/sd3serve/bin/pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
WORKDIR /src
COPY pyproject.toml constraints.txt README.md LICENSE ./
COPY src ./src
# Only what serving needs (no dev extra); the demo model and the playground ship inside the package.
RUN /opt/sd3serve/bin/pip install -c constraints.txt .

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/sd3serve /opt/sd3serve
RUN useradd --system --uid 10001 --home-dir /data --create-home sd3serve
USER 10001
ENV PATH=/opt/sd3serve/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    SD3SERVE_HOST=0.0.0.0 \
    SD3SERVE_PORT=8000 \
    SD3SERVE_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000
# Liveness only: /readyz says when the model is loaded (a real model takes minutes).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["sd3serve"]
CMD ["serve"]
