export PYTHONUNBUFFERED=1
# run from the repository root; OUT: a folder for the logs and tables
t0=$(date +%s)
(nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; nproc
 python -c "import torch,sys;print('torch',torch.__version__,'cuda',torch.version.cuda,'cudnn',torch.backends.cudnn.version(),'python',sys.version.split()[0])"
 git log -1 --format='commit %H' 2>/dev/null) > $OUT/env.txt 2>&1
cat $OUT/env.txt
echo "# python -m pytest -m gpu tests -rs -v -n 8 --dist load --ignore tests/test_tutorial.py --deselect tests/test_benchmark.py" > $OUT/pytest-gpu.txt
timeout 250 python -m pytest -m gpu tests -rs -v -n 8 --dist load -p no:cacheprovider --ignore tests/test_tutorial.py --ignore tests/test_benchmark.py 2>&1 | tee -a $OUT/pytest-gpu.txt | grep -E "FAILED|ERROR|passed|failed" | tail -40
echo "pytest done at $(( $(date +%s) - t0 )) s"
timeout 150 python -m tools.benchmark --device cuda --models vit_large --methods train copy distill --paths eager sdpa --batch-size 104 --memory-batch-size -1 --rounds 3 --out-dir $OUT/b224 > $OUT/bench.log 2>&1; echo "b224 rc $?"
grep "^|" $OUT/b224/BENCHMARK.md
echo "b224 done at $(( $(date +%s) - t0 )) s"
timeout 80 python -m tools.benchmark --device cuda --models vit_large --img-size 448 --methods train distill --paths eager sdpa --batch-size 16 --memory-batch-size -1 --rounds 2 --saved-bytes false --out-dir $OUT/b448 >> $OUT/bench.log 2>&1; echo "b448 rc $?"
grep "^|" $OUT/b448/BENCHMARK.md
echo "b448 done at $(( $(date +%s) - t0 )) s"
echo "# python -m pytest -m gpu tests/test_benchmark.py -rs -v" >> $OUT/pytest-gpu.txt
timeout 70 python -m pytest -m gpu tests/test_benchmark.py -rs -v -p no:cacheprovider 2>&1 | tee -a $OUT/pytest-gpu.txt | tail -4
echo "all done at $(( $(date +%s) - t0 )) s"
