# GPU host image: NVIDIA's Triton container + this project, repository built at image build.
#   docker build -t index-as-model .
#   docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 index-as-model
# The container's own `tritonserver` (on PATH) is used; the Python backend runs model.py with
# the container's Python, into which the pinned requirements are installed.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

WORKDIR /opt/index-as-model
# g++ compiles the CPU ops (kernels/build_ext.py: portable, AVX2 and AVX-VNNI builds, the
# fastest the CPU runs chosen when a process loads them)
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
COPY requirements.txt pyproject.toml ./
# The CUDA build of torch on a GPU host (the CPU pin in requirements.txt is for CPU machines).
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 \
 && grep -v '^torch==' requirements.txt | grep -v '^nvidia-pytriton' > /tmp/req.txt \
 && pip install --no-cache-dir -r /tmp/req.txt
COPY . .
# --force: a build/ext/ copied from the host may not match the image's libstdc++
RUN pip install --no-cache-dir --no-deps -e . && python kernels/build_ext.py --force \
 && python -m builder

# every TorchScript stage on the GPU when one is visible (serving/runners.py resolve_device);
# the baseline's FAISS search stays on the CPU, as the service it stands for
ENV TRITON_HOST=0.0.0.0 IAM_DEVICE=auto
EXPOSE 8000 8001 8002
# the same launcher as `make serve` (python -m serving.serve --help); SIGTERM (docker stop)
# stops the server and its stubs cleanly
CMD ["python", "-m", "serving.serve", "--host", "0.0.0.0"]
