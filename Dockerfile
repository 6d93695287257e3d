# nbdserve with the client tools used to check it (qemu-img/qemu-io, nbdinfo/nbdcopy).
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        qemu-utils libnbd-bin \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY nbdserve ./nbdserve
RUN pip install --no-cache-dir . && rm -rf /src

# An unprivileged user owning /images, so a fresh named volume mounted there is writable.
RUN useradd --system --uid 10809 --home-dir /images nbd \
    && mkdir /images && chown nbd:nbd /images
USER nbd
WORKDIR /images

EXPOSE 10809
# SIGTERM: stop accepting, finish in-flight requests, flush, exit 0.
STOPSIGNAL SIGTERM
CMD ["nbdserve", "--persistent", "--shared", "0", "memory:1G"]
