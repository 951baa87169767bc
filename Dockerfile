# kefu's one image: every process (worker, gateway, projector, topics) is a `kefu`
# subcommand. See docker-compose.yml for how they are run.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/kefu
WORKDIR /src
COPY . .
# Dependencies ship manylinux wheels; gcc builds kefu's own moderation extension
# (streams/_native), which would otherwise fall back to the slower Python path.
RUN apt-get update -q && apt-get install -y -q --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN /opt/kefu/bin/pip install .

FROM python:3.11-slim

# Non-root; its state dir (KEFU_STATE_DIR: the worker's Faust data) is its home.
RUN groupadd --system --gid 10001 kefu \
    && useradd --system --uid 10001 --gid kefu --home-dir /var/lib/kefu --no-create-home \
        --shell /usr/sbin/nologin kefu \
    && install -d -o kefu -g kefu -m 0750 /var/lib/kefu
COPY --from=build /opt/kefu /opt/kefu

ENV PATH=/opt/kefu/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KEFU_STATE_DIR=/var/lib/kefu

USER kefu
WORKDIR /var/lib/kefu
# Gateway (KEFU_GATEWAY__PORT) and worker web (KEFU_WORKER__WEB_PORT), as compose sets them.
EXPOSE 8000 6066
ENTRYPOINT ["kefu"]
CMD ["--help"]
