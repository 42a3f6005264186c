"""Transfer studies (`mpq study`): rows of policies (baselines and searches on proxies), each over
seeds, run as the existing stages and reported as study.json and study.md."""
