#!/usr/bin/env bash
# curl one-liners against camserve: URL (default http://localhost:8080), MODEL (default imagenet), IMAGE.
set -eu  # no pipefail: `| head` closes pipes early on purpose
URL=${URL:-http://localhost:8080}; MODEL=${MODEL:-imagenet}; IMAGE=${IMAGE:-assets/photos/chelsea.jpg}

# The models and their layers
curl -s "$URL/v1/models" | head -c 300; echo

# multipart: the default methods (Grad-CAM and guided Grad-CAM)
curl -s -F "image=@$IMAGE" "$URL/v1/models/$MODEL/explain" | head -c 200; echo

# multipart with options as text parts
curl -s -F "image=@$IMAGE" -F methods=gradcam++,layercam -F top_k=2 -F colormap=turbo "$URL/v1/models/$MODEL/explain" | head -c 200; echo

# the raw file, options in the query string, the first overlay saved as a PNG
curl -s -H 'Content-Type: image/jpeg' --data-binary "@$IMAGE" "$URL/v1/models/$MODEL/explain?methods=gradcam&outputs=overlay" \
  | python3 -c 'import json,sys,base64; open("overlay.png","wb").write(base64.b64decode(json.load(sys.stdin)["explanations"][0]["overlay_png"]))'
ls -la overlay.png

# JSON with base64
printf '{"image": "%s", "methods": ["eigencam"], "outputs": ["mask"]}' "$(base64 -w0 "$IMAGE")" \
  | curl -s -H 'Content-Type: application/json' --data-binary @- "$URL/v1/models/$MODEL/explain" | head -c 200; echo

# predictions only
curl -s -H 'Content-Type: image/jpeg' --data-binary "@$IMAGE" "$URL/v1/models/$MODEL/predict?top_k=3"; echo

# an error: problem+json with the reason
curl -s -H 'Content-Type: image/jpeg' --data-binary "@$IMAGE" "$URL/v1/models/$MODEL/explain?methods=magic"; echo
