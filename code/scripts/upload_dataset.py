"""Upload a VOC (and optionally SBD) folder as a versioned ClearML Dataset, then train from clearml://<id>.

    python code/scripts/upload_dataset.py DIR [--sbd SBD_DIR] [--project P] [--name VOC2012] [--output-uri URI]

DIR contains VOCdevkit/ (what DATASET_PATH points at); SBD_DIR holds cls/ img/ train.txt. A rerun on unchanged
files reuses the newest version; changed files make a child version that uploads only what changed. The
server comes from ~/clearml.conf, CLEARML_CONFIG_FILE or CLEARML_API_*; files go to its fileserver unless
--output-uri (or sdk.development.default_output_uri) names other storage.
"""

import argparse
from pathlib import Path

from vocseg.errors import UserError, exit_with


def main(argv=None) -> None:
    from vocseg.clearml import data as clearml_data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="folder that contains VOCdevkit/")
    parser.add_argument("--sbd", type=Path, help="SBD folder (cls/ img/ train.txt), uploaded as a second dataset")
    parser.add_argument("--project", default=clearml_data.PROJECT, help="ClearML project of the datasets")
    parser.add_argument("--name", default="VOC2012", help="dataset name of the VOC folder")
    parser.add_argument("--sbd-name", default="SBD", help="dataset name of the SBD folder")
    parser.add_argument("--output-uri", help="where the files go (default: the server's fileserver)")
    args = parser.parse_args(argv)
    jobs = [("voc", args.dir, args.name, "DATASET_PATH")] + (
        [("sbd", args.sbd, args.sbd_name, "SBD_DATASET_PATH")] if args.sbd else []
    )
    try:
        done = [
            (clearml_data.upload(folder, kind, name, args.project, args.output_uri), name, variable)
            for kind, folder, name, variable in jobs
        ]
    except UserError as exc:
        exit_with(exc)
    for result, name, _variable in done:
        what = "unchanged: reusing" if result.reused else "uploaded"
        print(f"{args.project}/{name}: {what} version {result.version}, dataset id {result.id} ({result.files} files)")
    for result, _, variable in done:
        print(f"export {variable}={clearml_data.SCHEME}{result.id}")


if __name__ == "__main__":
    main()
