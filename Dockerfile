# The selfsup image: the CLI, the controller, and the code every Ray node runs (driver and
# Train workers import the same packages). Build for CPU by default; for CUDA nodes pass
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /opt/selfsup
# torch first, from the chosen index, so that the project's pin is already satisfied and pip
# never swaps in another build.
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY selfsup ./selfsup
COPY service ./service
COPY workers ./workers
COPY pipelines ./pipelines
COPY examples ./examples
RUN pip install . && useradd --create-home selfsup
USER selfsup
WORKDIR /home/selfsup
ENTRYPOINT ["selfsup"]
CMD ["--help"]
