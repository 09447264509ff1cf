"""Download Pascal VOC 2012 (+SBD) into OUT; see `python code/scripts/download_dataset.py --help`."""

import sys

from vocseg.data.download import main

if __name__ == "__main__":
    sys.exit(main())
