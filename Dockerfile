# balance-exporter: a slim image that runs as a fixed non-root user and has no compiler.
#   docker build -t balance-exporter .
#   docker run -p 8397:8397 balance-exporter demo --web.listen-address :8397   # the demo
#   docker run -p 8397:8397 -v $PWD/config.yml:/etc/balance-exporter/config.yml:ro \
#     -v $PWD/secrets:/run/secrets:ro balance-exporter
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Behind a TLS-intercepting proxy, pass the path of its CA bundle inside the build context's
# image (e.g. --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt).
ARG PIP_CERT
WORKDIR /src
COPY pyproject.toml README.md ./
COPY balance_exporter ./balance_exporter
# The project's wheel and those of everything it needs, for an offline install below.
RUN python3 -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="balance-exporter" \
      org.opencontainers.image.description="Prometheus exporter for Gemini account balances" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /wheels /tmp/wheels
RUN python3 -m venv /opt/balance-exporter \
    && /opt/balance-exporter/bin/pip install --no-cache-dir --no-index \
       --find-links /tmp/wheels "balance-exporter==${VERSION}" \
    && rm -rf /tmp/wheels \
    && groupadd --system --gid 10001 exporter \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin exporter \
    && mkdir -p /etc/balance-exporter
ENV PATH=/opt/balance-exporter/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8397
# No curl in the image: Python asks the exporter's health endpoint.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8397/-/healthy', timeout=4)"]
ENTRYPOINT ["balance-exporter"]
CMD ["--config.file=/etc/balance-exporter/config.yml"]
