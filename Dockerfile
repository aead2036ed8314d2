# syntax=docker/dockerfile:1
#
# Two images from one source tree:
#
#   docker build --target operator -t REGISTRY/lethe-operator:0.1.0 .
#   docker build --target trainer  -t REGISTRY/lethe-trainer:0.1.0 .
#
# Each image installs the package with the same pip commands a developer
# runs (`pip install .[operator]`, `pip install .[trainer]`), into a virtual
# environment under /opt/lethe that a build stage fills and the final stage
# copies, so neither final stage keeps the source tree or pip's caches.
# Both run as the numeric user 10001, which owns no file in the image.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
# The trainer base must carry Python 3.11 (pyproject.toml requires >=3.11,<3.12)
# and torch 2.13.0 built for CUDA. The check in trainer-build stops the build
# with a message when a different tag breaks either.
ARG TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime


# ---------------------------------------------------------------- operator

FROM ${PYTHON_IMAGE} AS operator-build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/lethe
ENV PATH=/opt/lethe/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer ./trainer
COPY operator ./operator
# The base dependencies and the [operator] extra pull in no torch: the operator
# imports only the torch-free parts of lethe_trainer (specs, store layout).
# NOTE: versions come from the ranges in pyproject.toml; the repository has no
# lock file yet, so two builds a month apart may resolve different releases.
# hadolint ignore=DL3013
RUN pip install ".[operator]" \
 && python -c "import importlib.util, sys; importlib.util.find_spec('torch') and sys.exit('torch was installed into the operator image; remove it from the base dependencies')"


FROM ${PYTHON_IMAGE} AS operator

COPY --from=operator-build /opt/lethe /opt/lethe
ENV PATH=/opt/lethe/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["lethe-operator"]


# ----------------------------------------------------------------- trainer

FROM ${TORCH_IMAGE} AS trainer-build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The virtual environment sees the base image's site-packages, so the CUDA
# build of torch that the base ships is used as it is. pyproject.toml pins
# torch==2.13.0, and that public version also matches a local build such as
# 2.13.0+cu128, so pip keeps it. The constraint file repeats the installed
# version with its local part, so that a dependency asking for another torch
# makes pip fail instead of downloading a second, CPU-only or mismatched build.
RUN python -m venv --system-site-packages /opt/lethe \
 && python -c 'import sys; v = sys.version.split()[0]; sys.exit(None if v.startswith("3.11.") else f"TORCH_IMAGE has Python {v}; lethe requires 3.11: pick a tag with Python 3.11")' \
 && python -c 'import sys, torch; v = torch.__version__; sys.exit(None if v.split("+")[0] == "2.13.0" else f"TORCH_IMAGE has torch {v}; pyproject.toml pins torch==2.13.0: pick a matching tag")' \
 && python -c 'import sys, torch; sys.exit(None if torch.version.cuda else f"TORCH_IMAGE has a CPU-only torch {torch.__version__}: pick a -cuda tag")' \
 && python -c 'import torch; print(f"torch=={torch.__version__}")' > /tmp/torch-constraint.txt
ENV PATH=/opt/lethe/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer ./trainer
COPY operator ./operator
RUN pip install --constraint /tmp/torch-constraint.txt ".[trainer]" \
 && python -c "import torch, lethe_trainer; print('torch', torch.__version__, 'cuda', torch.version.cuda)"


FROM ${TORCH_IMAGE} AS trainer

COPY --from=trainer-build /opt/lethe /opt/lethe
# HOME and the Hugging Face cache point at /tmp, which a Pod can mount as an
# emptyDir (or a larger volume for big models) under a read-only root.
ENV PATH=/opt/lethe/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["lethe-trainer"]
