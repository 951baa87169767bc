# kefu's one image: every process (worker, gateway, projector, topics) is a `kefu`
# subcommand. See docker-compose.yml for how they are run.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/kefu
WORKDIR /src
COPY . .
# Every dependency ships manylinux wheels: no compiler needed.
RUN /opt/kefu/bin/pip install .

FROM python:3.11-slim

RUN groupadd --system --gid 10001 kefu \
    && useradd --system --uid 10001 --gid kefu --home-dir /var/lib/kefu --create-home \
        --shell /usr/sbin/nologin kefu
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
