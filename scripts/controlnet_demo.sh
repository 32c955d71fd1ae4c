#!/usr/bin/env bash
# The README's ControlNet example on the default model and its trained canny ControlNet: set up, export the model
# with its ControlNet, start tritonserver and the A1111 gateway, send one request from the CLI and one through the
# gateway as sd-webui-controlnet takes it, save both PNGs and the figure docs/controlnet.png shows.
#     scripts/controlnet_demo.sh [control-picture.png]
# Ports: SDTRT_HTTP_PORT (8000), SDTRT_GRPC_PORT (8001), SDTRT_METRICS_PORT (8002), SDTRT_API_PORT (7861).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
"$ROOT/scripts/setup.sh"
VENV=${SDTRT_VENV:-$ROOT/.venv}
export PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1
CONTROL=${1:-docs/controlnet_input.png}
PROMPT="a large red triangle on a blue background"
HTTP=${SDTRT_HTTP_PORT:-8000} GRPC=${SDTRT_GRPC_PORT:-8001} METRICS=${SDTRT_METRICS_PORT:-8002}
API=${SDTRT_API_PORT:-7861}
OUT=outputs/controlnet

sdtrt init-default --out models/default --controlnets models/controlnets
sdtrt export models/default --out repos/default-controlnet --controlnets models/controlnets

mkdir -p logs "$OUT"
sdtrt serve -m repos/default-controlnet --http-port "$HTTP" --grpc-port "$GRPC" --metrics-port "$METRICS" \
  --log-file logs/tritonserver-controlnet.log >logs/serve-controlnet.out 2>&1 &
SERVER=$!
sdtrt api --url "localhost:$GRPC" --port "$API" --out "$OUT" --wait-for-server 120 >logs/api-controlnet.out 2>&1 &
GATEWAY=$!
trap 'kill -TERM $GATEWAY $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; tail -n 1 logs/serve-controlnet.out' EXIT
until grep -q "^ready:" logs/serve-controlnet.out; do
  kill -0 $SERVER 2>/dev/null || { cat logs/serve-controlnet.out; echo "demo: the server did not start" >&2; exit 1; }
  sleep 0.5
done

# The CLI: the prompt alone, then steered by the control picture's edges (the extension's canny, pixel perfect).
SETTINGS=(--steps 20 --sampler "Euler a" --cfg-scale 7 --seed 42 --url "localhost:$GRPC")
sdtrt txt2img "$PROMPT" "${SETTINGS[@]}" --out "$OUT/plain"
sdtrt txt2img "$PROMPT" "${SETTINGS[@]}" --out "$OUT/cli" \
  --controlnet "shapes_canny:$CONTROL:1.0,module=canny,pixel_perfect=true"

# The gateway: the request an A1111 script sends (alwayson_scripts.controlnet.args), and the map it computes.
until curl -sf "localhost:$API/controlnet/version" >/dev/null; do
  kill -0 $GATEWAY 2>/dev/null || { cat logs/api-controlnet.out; echo "demo: the gateway did not start" >&2; exit 1; }
  sleep 0.5
done
IMAGE=$(base64 -w0 "$CONTROL")
curl -sf "localhost:$API/sdapi/v1/txt2img" -H 'Content-Type: application/json' -d '{"prompt": "'"$PROMPT"'",
  "steps": 20, "sampler_name": "Euler a", "cfg_scale": 7, "seed": 42, "width": 64, "height": 64,
  "alwayson_scripts": {"controlnet": {"args": [{"enabled": true, "model": "shapes_canny", "module": "canny",
  "pixel_perfect": true, "image": "'"$IMAGE"'"}]}}}' >"$OUT/gateway.json"
curl -sf "localhost:$API/controlnet/detect" -H 'Content-Type: application/json' -d '{"controlnet_module": "canny",
  "controlnet_input_images": ["'"$IMAGE"'"], "controlnet_processor_res": 64}' >"$OUT/detect.json"

python - "$CONTROL" "$OUT" <<'EOF'
"""The figure: the control picture, its canny map (from /controlnet/detect), the prompt alone, the CLI's and the
gateway's steered pictures, each enlarged 4x with nearest pixels, and labels."""
import base64, io, json, sys
from pathlib import Path
from PIL import Image, ImageDraw

control, out = Path(sys.argv[1]), Path(sys.argv[2])
def newest(folder):
    return Image.open(sorted((out / folder).glob("*.png"))[-1])
def decoded(name, key):
    return Image.open(io.BytesIO(base64.b64decode(json.loads((out / name).read_text())[key][0])))
gateway = decoded("gateway.json", "images")
gateway.save(out / "gateway.png")
panels = [("control picture", Image.open(control)), ("canny map", decoded("detect.json", "images")),
          ("prompt alone", newest("plain")), ("CLI, ControlNet", newest("cli")), ("gateway, ControlNet", gateway)]
scale, pad, label = 4, 8, 18
w = 64 * scale
figure = Image.new("RGB", (len(panels) * (w + pad) + pad, w + label + 2 * pad), "white")
draw = ImageDraw.Draw(figure)
for i, (name, picture) in enumerate(panels):
    x = pad + i * (w + pad)
    figure.paste(picture.convert("RGB").resize((w, w), Image.NEAREST), (x, pad))
    draw.text((x, pad + w + 4), name, fill="black")
figure.save(out / "figure.png")
print(f"wrote {out / 'figure.png'} (the prompt: {sys.argv[1]} steered by its edges)")
EOF
