# The product on a GPU node. Build:   docker build -t ecg-audio-analyzer .
# Run (embedded models; they use the GPU when one is visible). Clients send `Authorization: Bearer <key>`;
# local paths are read only under /data (mount your media there):
#   docker run --gpus all -p 8080:8080 -v ecg-state:/state -v /srv/media:/data:ro \
#     -e ECG_API_KEYS=change-me ecg-audio-analyzer
# Run the T4 production profile (large-v2, pyannote/speaker-diarization-3.1):
#   docker run --gpus all -p 8080:8080 -v ecg-state:/state -e ECG_API_KEYS=change-me \
#     -e SERVE_CONFIG=serve_config.gpu.yaml -e ECG_DIARIZATION__HF_TOKEN=hf_... ecg-audio-analyzer
# The Ray dashboard listens on the container's loopback only (its job API runs arbitrary code):
#   docker exec -it <container> ray status, or -e RAY_DASHBOARD_HOST=0.0.0.0 -e RAY_AUTH_MODE=token
#   -e RAY_AUTH_TOKEN=... -p 8265:8265 to publish it behind Ray's token authentication.
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

# Job database, assembled embedded models and the Hugging Face cache live on the /state volume;
# /data holds the media clients may name by path (nothing else is readable to them).
ENV ECG_JOBS__DB_PATH=/state/jobs.sqlite3 \
    ECG_CACHE_DIR=/state/cache \
    HF_HOME=/state/huggingface \
    ECG_SERVER__UPLOAD_DIR=/state/uploads \
    ECG_MEDIA__LOCAL_ROOTS='["/data"]' \
    RAY_DASHBOARD_HOST=127.0.0.1
VOLUME ["/state", "/data"]

# 8080: the API. The dashboard (8265) is bound to loopback unless RAY_DASHBOARD_HOST says otherwise.
EXPOSE 8080
ENV SERVE_CONFIG=serve_config.yaml
CMD ["sh", "-c", "ray start --head --dashboard-host=\"$RAY_DASHBOARD_HOST\" --disable-usage-stats && exec serve run \"$SERVE_CONFIG\""]
