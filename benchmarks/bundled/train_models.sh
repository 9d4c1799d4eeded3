#!/usr/bin/env bash
# The commands that train MedSegSuite's demo models on ../shared/data and package them
# into Resources/Models/<id>/ (see package_model.py). Run from the repository root:
#
#   benchmarks/bundled/train_models.sh [MODEL_ID ...]      (default: every model below)
#
# Trained folders go to $TRAIN_DIR (default ./build/models). An interrupted run continues
# where it stopped when the same command is given again (--resume is added when a
# checkpoint exists). Each run records its validation split in its card, and
# package_model.py re-measures the metrics on that split at the images' own resolution.
set -euo pipefail
cd "$(dirname "$0")/../.."

data="${DATA_DIR:-../shared/data}"
out="${TRAIN_DIR:-build/models}"
labels=benchmarks/bundled
mkdir -p "$out"

train() {  # train ID ARGS...: trains into $out/ID, resuming an interrupted run
  local id="$1"
  shift
  if [[ -d "$out/$id" ]]; then
    echo "$id: already trained in $out/$id"
    return
  fi
  local resume=()
  [[ -f "$out/$id.training/checkpoint.pt" ]] && resume=(--resume)
  medsegsuite -v train --id "$id" -o "$out/$id" "$@" "${resume[@]}"
}

hippocampus-dnet-lite() {
  train hippocampus-dnet-lite --network dnet --preset lite --data "$data/msd_hippocampus" \
    --name "Hippocampus (D-Net lite)" \
    --description "Anterior and posterior hippocampus on T1-weighted MRI, trained on the Medical Segmentation Decathlon hippocampus task." \
    --labels "$labels/hippocampus_labels.json" --iterations 2000 --batch-size 2 \
    --patch 32,64,32 --spacing 1,1,1 --validate-every 250 \
    --data-licence "CC BY-SA 4.0 (Medical Segmentation Decathlon)"
  python benchmarks/bundled/package_model.py "$out/hippocampus-dnet-lite" "$data/msd_hippocampus"
}

polyp-banet-lite() {
  # bf16 autocast and channels-last on the CPU (the recipe's defaults), 192x192 inputs.
  # The bundled weights (validation Dice 0.8405) come from exactly this command, run as
  # `OMP_NUM_THREADS=1 nice -n 5 benchmarks/bundled/train_models.sh polyp-banet-lite` on the
  # 2-core CPU while tests ran beside it; it was stopped once at iteration 60 and resumed.
  train polyp-banet-lite --network banet --preset lite --data "$data/kvasir_seg" \
    --name "Colon polyp (BA-Net lite)" \
    --description "Polyps in colonoscopy photographs, trained on Kvasir-SEG." \
    --labels "$labels/polyp_labels.json" --iterations 6000 --batch-size 8 --size 192,192 \
    --validate-every 500 --data-licence "Kvasir-SEG: research and education use only"
  python benchmarks/bundled/package_model.py "$out/polyp-banet-lite" "$data/kvasir_seg"
}

polyp-condseg-lite() {
  train polyp-condseg-lite --network condseg --preset lite --data "$data/kvasir_seg" \
    --name "Colon polyp (ConDSeg lite)" \
    --description "Polyps in colonoscopy photographs, trained on Kvasir-SEG with ConDSeg's two-stage recipe." \
    --labels "$labels/polyp_labels.json" --iterations 2000 --batch-size 4 --size 192,192 \
    --validate-every 250 --recipe stage1_fraction=0.2 \
    --data-licence "Kvasir-SEG: research and education use only"
  python benchmarks/bundled/package_model.py "$out/polyp-condseg-lite" "$data/kvasir_seg" --drop-aux
}

polyp-hidiff-lite() {
  train polyp-hidiff-lite --network hidiff --preset lite --data "$data/kvasir_seg" \
    --name "Colon polyp (HiDiff lite: segmentor + refiner)" \
    --description "Polyps in colonoscopy photographs; HiDiff's segmentor with its Bernoulli diffusion refiner, trained on Kvasir-SEG." \
    --labels "$labels/polyp_labels.json" --iterations 3000 --batch-size 8 --size 224,224 \
    --validate-every 300 --data-licence "Kvasir-SEG: research and education use only"
  python benchmarks/bundled/package_model.py "$out/polyp-hidiff-lite" "$data/kvasir_seg"
}

left-atrium-canet-lite() {
  # Semi-supervised: labels of 8 of the 24 cases (a third), the rest unlabelled.
  train left-atrium-canet-lite --network canet --preset lite --data "$data/la_mri_2018/h5" \
    --name "Left atrium (CANet lite, semi-supervised)" \
    --description "Left atrium on late-gadolinium-enhanced MRI; CANet trained with 8 labelled and the remaining cases unlabelled." \
    --labels "$labels/left_atrium_labels.json" --h5-spacing 0.625,0.625,0.625 --labelled-cases 8 \
    --iterations 3000 --batch-size 2 --validate-every 300 \
    --data-licence "2018 Atrial Segmentation Challenge: research use only"
  python benchmarks/bundled/package_model.py "$out/left-atrium-canet-lite" "$data/la_mri_2018/h5" \
    --h5-spacing 0.625,0.625,0.625
}

models=("$@")
[[ ${#models[@]} -eq 0 ]] && models=(hippocampus-dnet-lite polyp-banet-lite polyp-condseg-lite polyp-hidiff-lite left-atrium-canet-lite)
for model in "${models[@]}"; do
  "$model"
done
