# camserve, CPU image. Build: docker build -t camserve .   Run: docker run -p 8080:8080 camserve
# The CUDA variant is Dockerfile.cuda. scripts/container-test.sh builds and checks this image with podman.

# --- build the binary from source
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY assets assets
COPY bench bench
COPY openapi.yaml ./
RUN cargo build --release --locked --bin camserve && strip target/release/camserve

# --- ONNX Runtime's shared library from the PyPI wheel (pip download; nothing else is fetched)
FROM debian:bookworm-slim AS ort
ARG ORT_VERSION=1.31.1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m pip download --no-deps --only-binary=:all: --dest /wheel "onnxruntime==${ORT_VERSION}" \
    && mkdir -p /ort && python3 -c "import glob, zipfile; \
z = zipfile.ZipFile(glob.glob('/wheel/*.whl')[0]); \
[open('/ort/' + n.rsplit('/', 1)[1], 'wb').write(z.read(n)) for n in z.namelist() if '/capi/libonnxruntime' in n and '.so' in n]" \
    && ls -la /ort

# --- runtime
FROM debian:bookworm-slim
ARG ORT_VERSION=1.31.1
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /opt/camserve --shell /usr/sbin/nologin camserve
COPY --from=ort /ort/ /opt/camserve/lib/
COPY --from=build /src/target/release/camserve /usr/local/bin/camserve
COPY models/imagenet.onnx models/imagenet.labels.txt models/demo.onnx models/demo.labels.txt models/shapes_detector.onnx models/shapes_segmenter.onnx models/shapes_segmenter.labels.txt models/shapes_embedder.onnx models/shapes_multilabel.onnx models/shapes_multilabel.labels.txt /opt/camserve/models/
COPY config/camserve.toml /opt/camserve/config/camserve.toml
WORKDIR /opt/camserve
# Every setting can be overridden with CAMSERVE_SECTION__KEY (see config/camserve.toml), e.g.
#   CAMSERVE_SERVER__API_KEYS='["secret"]'  CAMSERVE_BATCHING__MAX_BATCH=16  CAMSERVE_RUNTIME__THREADS=4
# Mount your models under /opt/camserve/models and point CAMSERVE_CONFIG at your own file.
ENV ORT_DYLIB_PATH=/opt/camserve/lib/libonnxruntime.so.${ORT_VERSION} \
    CAMSERVE_CONFIG=/opt/camserve/config/camserve.toml \
    CAMSERVE_LOG_FORMAT=json \
    CAMSERVE_RUNTIME__DEVICE=cpu
USER camserve
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["camserve"]
CMD ["serve"]
