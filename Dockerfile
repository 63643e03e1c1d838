# The product on a GPU node. Build:   docker build -t ecg-audio-analyzer .
# Run (embedded models; they use the GPU when one is visible):
#   docker run --gpus all -p 8080:8080 -v ecg-data:/data ecg-audio-analyzer
# Run the T4 production profile (large-v2, pyannote/speaker-diarization-3.1):
#   docker run --gpus all -p 8080:8080 -p 8265:8265 -v ecg-data:/data \
#     -e SERVE_CONFIG=serve_config.gpu.yaml -e ECG_DIARIZATION__HF_TOKEN=hf_... ecg-audio-analyzer
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=ghcr.io/astral-sh/uv:0.9 /uv /usr/local/bin/uv

WORKDIR /app
# Dependencies first, so code edits do not reinstall torch.
COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY deployments/ deployments/
RUN uv venv --python 3.11 /opt/venv && uv pip install --no-cache .
COPY configs/ configs/
COPY serve_config.yaml serve_config.gpu.yaml ./

# Job database, assembled embedded models and the Hugging Face cache live on a volume.
ENV ECG_JOBS__DB_PATH=/data/jobs.sqlite3 \
    ECG_CACHE_DIR=/data/cache \
    HF_HOME=/data/huggingface
VOLUME /data

# 8080: the API; 8265: the Ray dashboard (started on all interfaces so -p can reach it).
EXPOSE 8080 8265
ENV SERVE_CONFIG=serve_config.yaml
CMD ["sh", "-c", "ray start --head --dashboard-host=0.0.0.0 --disable-usage-stats && exec serve run \"$SERVE_CONFIG\""]
