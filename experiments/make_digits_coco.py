"""Write the handwritten-digits detection/instance-segmentation dataset (COCO format).

Example::

    python experiments/make_digits_coco.py data/digits_coco --num-train 400 --num-val 100
"""

import argparse

from digits_coco import make_digits_coco


def parse_args() -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir', nargs='?', default='data/digits_coco',
                        help='dataset root (default: %(default)s)')
    parser.add_argument('--num-train', type=int, default=200, help='training images')
    parser.add_argument('--num-val', type=int, default=50, help='validation images')
    parser.add_argument('--image-size', type=int, default=128, help='square image side')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    return parser.parse_args()


def main() -> None:
    """Generate the dataset and print where it went."""
    args = parse_args()
    info = make_digits_coco(args.out_dir, num_train=args.num_train, num_val=args.num_val,
                            image_size=args.image_size, seed=args.seed)
    for split in ('train', 'val'):
        print(f"{split}: {info[f'num_{split}_images']} images, "
              f"{info[f'num_{split}_instances']} digits -> {info[f'{split}_ann_file']}")


if __name__ == '__main__':
    main()
