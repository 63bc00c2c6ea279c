"""Tools around the course, kept apart from it: run from the repository root with `python -m tools.NAME`. They
measure and draw; the results pages that say what the numbers show are written by people (tests/test_pages.py,
tests/test_features_page.py and tests/test_variants.py check each number they state).

    reproduce.py, reproduce_report.py   the paper's Table 1 in miniature: every method, several seeds, one command
                                        (results.json, TABLE.md, results.png)
    benchmark.py, benchmark_cases.py    speed and memory of every method's step, the two attention implementations
                                        against the authors' way of computing it (the naive path of
                                        benchmark_cases.py, also the tests' reference): BENCHMARK.md, benchmark.json
    features.py                         does a student learn features of its own: linear CKA block by block to the
                                        teacher, seed to seed, method to method; top-1 (features.json, TABLE.md)
    student_study.sh                    the runs of results/student-study/STUDY.md
    gpu_check.sh                        on a GPU, in one call: the gpu tests, auto against eager, the start-up checks,
                                        ViT-L/16's benchmark (results/benchmark-h200/)
    variants.sh, variants.py            the paper's other findings in miniature: the runs, then variants.json and
                                        variants.png of results/fashion-mnist/variants/
    tutorial.py                         tutorial.ipynb's helper module: its images, the runner of its scripts, its figures
    palette.py                          one colour per method, for every figure
"""
